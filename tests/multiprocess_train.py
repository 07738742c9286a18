"""A few NanoVLMTrainer steps on N processes; run by tests/test_multiprocess.py under torchrun (gloo, CPU).

Trains twice: uninterrupted, then resumed from the checkpoint inside the second epoch. Each rank writes
OUT_DIR/rank{R}.json: the dataset indices of every batch it trained on, in order, for both runs, and checksums of the
initial and final weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/multiprocess_train.py OUT_DIR [stream|one_factor|fsdp2]

With `stream`, the rows are a `datasets.IterableDataset` (4 shards) trained for 6 steps through buffered bucketing;
the record then also holds the batches this rank's stream gives for epochs 0 and 1, computed on their own.
"""

import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "examples")]  # the package, and the offline tokenizer

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer, tiny_config  # noqa: E402
from processing import NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor  # noqa: E402

from offline_tokenizer import build_tokenizer  # noqa: E402

NUM_SAMPLES = 9  # 5 batches of 2: not a multiple of 2 processes, so the sampler must split one
NUM_EPOCHS = 2
ANSWERS = ["7", "The digit 3, top left.", "1 bottom right"]


class RecordingCollator(NanoVLMCollator):
    def __init__(self, processor):
        super().__init__(processor)
        self.seen = []

    def __call__(self, rows):
        self.seen.append([row["index"] for row in rows])
        return super().__call__(rows)


def checksum(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def make_rows():
    rng = np.random.default_rng(0)
    return [
        {
            "index": index,
            "image": rng.integers(0, 256, (int(rng.integers(32, 160)), int(rng.integers(32, 160)), 3), dtype=np.uint8),
            "prompt": "Which digit is shown and where?",
            "answer": ANSWERS[index % len(ANSWERS)],
        }
        for index in range(NUM_SAMPLES)
    ]


def make_stream():
    import datasets

    features = datasets.Features({"index": datasets.Value("int64"), "image": datasets.Image(),
                                  "prompt": datasets.Value("string"), "answer": datasets.Value("string")})
    return datasets.Dataset.from_list(make_rows(), features=features).to_iterable_dataset(num_shards=4)


def train(out_dir, processor, resume_from_checkpoint=None, stream=False):
    """Two epochs (3 steps each per process), a checkpoint after step 4, i.e. inside the second epoch.

    Streamed: 6 steps (the processes' shards hold 5 and 4 rows: 3 and 2 batches of 2 per epoch), checkpoint at 4."""
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(tiny_config(shuffle_factors=processor.image_processor.shuffle_factors))
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, num_train_epochs=NUM_EPOCHS, learning_rate=2e-3,
        logging_steps=1, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0, ddp_backend="gloo", max_steps=6 if stream else -1,
    )
    collator = RecordingCollator(processor)
    trainer = NanoVLMTrainer(
        model=model, args=args, train_dataset=make_stream() if stream else make_rows(), data_collator=collator,
        processing_class=processor, stream_buffer_size=4,
    )
    initial = checksum(trainer.model)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, collator.seen, initial


FSDP_FACTORS = (1, 2)


def fsdp2(out_dir, tokenizer):
    """FSDP2 (`fully_shard`) on gloo: 6 steps, a distributed checkpoint after step 4, a resumed run; rank 0 also
    loads the gathered full weights into a plain model.

    The shard units are the layer classes fsdp_bf16.yaml names. Rank 0's batches hold one image shape, rank 1's
    two, so the vision tower runs once on rank 0 and twice on rank 1: this only works while the tower is not split
    into units of its own (each call of a unit gathers its weights: a different number of collectives per process).
    Two shuffle factors, and steps where the processes' batches use different ones: the model gives an unused
    projection a zero gradient, so FSDP's gradient reduce-scatter matches between processes.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from accelerate.commands.config.config_args import load_config_from_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = load_config_from_file(os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate",
                                                "fsdp_bf16.yaml"))
    layer_classes = set(config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    processor = NanoVLMProcessor(
        NanoVLMImageProcessor(max_image_tokens=16, max_image_size=256, shuffle_factors=FSDP_FACTORS), tokenizer
    )
    rows, collator = make_rows(), NanoVLMCollator(processor)
    batches = [collator([rows[(2 * step + rank) % len(rows)], rows[(2 * step + 3 * rank) % len(rows)]])
               for step in range(6)]  # each process its own rows; rank 0 one image twice (one shape)
    tower_calls = [len({tuple(hw) for hw in batch["image_grid_hw"].tolist()}) for batch in batches]
    factors_used = [sorted(set(batch["image_shuffle_factor"].tolist())) for batch in batches]
    checkpoint = os.path.join(out_dir, "fsdp2-checkpoint-4")

    def build():
        torch.manual_seed(0)
        model = NanoVLMForConditionalGeneration(tiny_config(shuffle_factors=FSDP_FACTORS))
        units = [module for module in model.modules() if type(module).__name__ in layer_classes]
        for module in units:
            fully_shard(module)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=2e-3), len(units) + 1

    def steps(model, optimizer, batch_range, save=False):
        losses = []
        for step in batch_range:
            loss = model(**batches[step]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(loss.item(), 6))
            if step == 3 and save:  # decided alike on every process: dcp.save is a collective
                model_state, optimizer_state = get_state_dict(model, optimizer)
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
        return losses

    def full_weights(model):
        return get_state_dict(model, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]

    model, optimizer, units = build()
    initial = checksum_of(full_weights(model))  # every process takes part in gathering; rank 0 gets the weights
    losses = steps(model, optimizer, range(6), save=True)
    after = full_weights(model)
    record = {
        "parameter_type": type(next(model.parameters())).__name__,
        "shard_units": units,
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
        "full_numel": sum(p.numel() for p in model.parameters()),
        "losses": losses,
        "tower_calls": tower_calls,
        "factors_used": factors_used,
    }
    resumed, resumed_optimizer, _ = build()
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    # parameters that never had a gradient (e.g. DINOv3's mask token) have no optimizer state in the checkpoint
    dcp.load(state, checkpoint_id=checkpoint, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    record["resumed_losses"] = steps(resumed, resumed_optimizer, range(4, 6))
    resumed_after = full_weights(resumed)
    if rank == 0:
        plain = NanoVLMForConditionalGeneration(tiny_config(shuffle_factors=FSDP_FACTORS))
        plain.load_state_dict(after)  # strict: the gathered keys are the model's own
        record.update(initial=initial, after=checksum_of(after), resumed_after=checksum_of(resumed_after),
                      loaded_strict=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)
    dist.destroy_process_group()


def checksum_of(state_dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main():
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(["Which digit is shown and where? " + " ".join(ANSWERS)] * 20)
    if len(sys.argv) > 2 and sys.argv[2] == "fsdp2":
        return fsdp2(out_dir, tokenizer)
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    # one_factor: every batch uses the same connector projection (ZeRO and FSDP need the same parameters to get
    # gradients on every process; see fsdp2)
    factors = {"shuffle_factors": [2]} if mode == "one_factor" else {}
    processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=16, max_image_size=256, **factors), tokenizer)
    stream = mode == "stream"
    trainer, batches, initial = train(os.path.join(out_dir, "full"), processor, stream=stream)
    rank = trainer.args.process_index
    checkpoint = os.path.join(out_dir, "full", "checkpoint-4")
    resumed, resumed_batches, _ = train(os.path.join(out_dir, "resumed"), processor, resume_from_checkpoint=checkpoint,
                                        stream=stream)
    record = {"world_size": trainer.args.world_size, "distributed_type": str(trainer.accelerator.distributed_type),
              "mixed_precision": trainer.accelerator.mixed_precision}
    if stream:
        record["stream_epochs"] = [[[row["index"] for row in batch] for batch in trainer.train_stream.batches(epoch)]
                                   for epoch in range(4)]
    else:
        record["batches_per_epoch"] = len(trainer.get_train_dataloader())
    record.update({
        "batches": batches,
        "resumed_batches": resumed_batches,
        "after": checksum(trainer.model),
        "resumed_after": checksum(resumed.model),
        "initial": initial,
    })
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)


if __name__ == "__main__":
    main()
