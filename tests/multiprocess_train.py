"""A few NanoVLMTrainer steps on N processes; run by tests/test_multiprocess.py under torchrun (gloo, CPU).

Trains twice: uninterrupted, then resumed from the checkpoint inside the second epoch. Each rank writes
OUT_DIR/rank{R}.json: the dataset indices of every batch it trained on, in order, for both runs, and checksums of the
initial and final weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/multiprocess_train.py OUT_DIR
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer, tiny_config  # noqa: E402
from processing import NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor  # noqa: E402
from processing.offline_tokenizer import build_tokenizer  # noqa: E402

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


def train(out_dir, processor, resume_from_checkpoint=None):
    """Two epochs (3 steps each per process), a checkpoint after step 4, i.e. inside the second epoch."""
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(tiny_config())
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, num_train_epochs=NUM_EPOCHS, learning_rate=2e-3,
        logging_steps=1, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0, ddp_backend="gloo",
    )
    collator = RecordingCollator(processor)
    trainer = NanoVLMTrainer(
        model=model, args=args, train_dataset=make_rows(), data_collator=collator, processing_class=processor
    )
    initial = checksum(trainer.model)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, collator.seen, initial


def main():
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(["Which digit is shown and where? " + " ".join(ANSWERS)] * 20)
    processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=16, max_image_size=256), tokenizer)

    trainer, batches, initial = train(os.path.join(out_dir, "full"), processor)
    rank = trainer.args.process_index
    checkpoint = os.path.join(out_dir, "full", "checkpoint-4")
    resumed, resumed_batches, _ = train(os.path.join(out_dir, "resumed"), processor, resume_from_checkpoint=checkpoint)
    record = {
        "world_size": trainer.args.world_size,
        "batches_per_epoch": len(trainer.get_train_dataloader()),
        "batches": batches,
        "resumed_batches": resumed_batches,
        "after": checksum(trainer.model),
        "resumed_after": checksum(resumed.model),
        "initial": initial,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)


if __name__ == "__main__":
    main()
