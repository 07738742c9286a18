"""StreamingBucketBatches (buffered bucketing of a datasets.IterableDataset) and NanoVLMTrainer on a stream."""

import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from processing import BucketBatchSampler, NanoVLMCollator, NanoVLMImageProcessor, StreamingBucketBatches

NUM_ROWS = 120
FEATURES = datasets.Features({
    "id": datasets.Value("int64"),
    "image": datasets.Image(),
    "prompt": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "text_tokens": datasets.Value("int64"),
})


def png(height, width, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_dataset(count=NUM_ROWS, seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        {
            "id": index,
            "image": {"bytes": png(int(rng.integers(24, 400)), int(rng.integers(24, 400)), index), "path": None},
            "prompt": "Which digit is shown and where?",
            "answer": "7 top-left" * int(rng.integers(1, 4)),
            "text_tokens": int(rng.integers(5, 60)),
        }
        for index in range(count)
    ]
    return datasets.Dataset.from_list(rows, features=FEATURES)


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


@pytest.fixture(scope="module")
def image_processor():
    return NanoVLMImageProcessor(max_image_tokens=64, max_image_size=512)


def stream(dataset, image_processor, num_shards=4, **kwargs):
    settings = dict(text_length="text_tokens", batch_size=4, buffer_size=32, seed=0)
    settings.update(kwargs)
    return StreamingBucketBatches(dataset.to_iterable_dataset(num_shards=num_shards), image_processor, **settings)


def ids(batches):
    return [[row["id"] for row in batch] for batch in batches]


def lengths_and_shapes(dataset, image_processor):
    """Reference figures straight from the plan, per row id: (text + image tokens, bucket key, (height, width))."""
    from processing import bucket_key

    out = {}
    for row in dataset.cast_column("image", datasets.Image(decode=False)):
        with Image.open(io.BytesIO(row["image"]["bytes"])) as image:
            width, height = image.size
        plan = image_processor.plan(height, width)
        out[row["id"]] = (row["text_tokens"] + plan.num_tokens, bucket_key(plan), (height, width))
    return out


# --- batches ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [dict(batch_size=4), dict(max_tokens_per_batch=400), dict(batch_size=3, buffer_size=3)]
)
def test_every_row_exactly_once_per_epoch(dataset, image_processor, settings):
    settings = {"batch_size": None, **settings}
    batches = stream(dataset, image_processor, **settings)
    for epoch in range(2):
        batches.set_epoch(epoch)
        seen = sorted(index for batch in ids(batches) for index in batch)
        assert seen == list(range(NUM_ROWS)), f"epoch {epoch}"


def test_batches_respect_the_token_budget_and_the_batch_size(dataset, image_processor):
    reference = lengths_and_shapes(dataset, image_processor)
    budget = 400
    batches = list(stream(dataset, image_processor, batch_size=6, max_tokens_per_batch=budget))
    for batch in batches:
        lengths = [reference[row["id"]][0] for row in batch]
        assert len(batch) <= 6
        assert len(batch) * max(lengths) <= budget + len(batch) * 15  # rounded up to length_step 16 when packing
    assert max(len(batch) for batch in batches) > 1  # the budget is used, not one row per batch


def test_rows_carry_their_stream_position_and_encoded_images(dataset, image_processor):
    batches = list(stream(dataset, image_processor, shuffle=False))
    positions = sorted(row["__index__"] for batch in batches for row in batch)
    assert positions == list(range(NUM_ROWS))
    row = batches[0][0]
    assert isinstance(row["image"], bytes)  # not decoded while batching; the collator decodes it
    assert Image.open(io.BytesIO(row["image"])).size[0] > 0


def test_buffer_groups_by_bucket_better_than_stream_order(dataset, image_processor):
    reference = lengths_and_shapes(dataset, image_processor)

    def mixed_buckets(batches):
        return sum(len({reference[i][1] for i in batch}) for batch in batches) / len(batches)

    small = ids(stream(dataset, image_processor, buffer_size=4))  # one batch: no choice, stream order
    large = ids(stream(dataset, image_processor, buffer_size=NUM_ROWS))
    assert mixed_buckets(large) < mixed_buckets(small)
    # With the whole epoch in the buffer, the batches mix buckets exactly as full bucketing does.
    sizes = [reference[i][2] for i in range(NUM_ROWS)]
    text = [reference[i][0] - image_processor.plan(*sizes[i]).num_tokens for i in range(NUM_ROWS)]
    sampler = BucketBatchSampler(sizes, text, image_processor, batch_size=4)
    sampler_mixing = sum(len({reference[i][1] for i in batch}) for batch in sampler.batches(0)) / sampler.num_batches
    assert len(large) == sampler.num_batches
    assert mixed_buckets(large) == pytest.approx(sampler_mixing)


def test_deterministic_per_seed_and_epoch_and_different_between_epochs(dataset, image_processor):
    first, second = stream(dataset, image_processor), stream(dataset, image_processor)
    assert ids(first) == ids(second)
    first.set_epoch(1)
    epoch_one = ids(first)
    assert epoch_one != ids(second)
    second.set_epoch(1)
    assert ids(second) == epoch_one
    assert ids(stream(dataset, image_processor, seed=1)) != ids(stream(dataset, image_processor, seed=0))


def test_resume_gives_the_remaining_batches(dataset, image_processor):
    full = stream(dataset, image_processor)
    full.set_epoch(1)
    expected = ids(full)

    interrupted = stream(dataset, image_processor)
    interrupted.set_epoch(1)
    iterator = iter(interrupted)
    done = [[row["id"] for row in next(iterator)] for _ in range(7)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint file
    assert state["epoch"] == 1 and state["num_batches_yielded"] == 7

    resumed = stream(dataset, image_processor)
    resumed.load_state_dict(state)
    assert done + ids(resumed) == expected


def test_repeat_continues_across_epochs_and_resumes_across_them(dataset, image_processor):
    once = stream(dataset, image_processor)
    epochs = ids(once)
    once.set_epoch(1)
    epochs += ids(once)

    endless = stream(dataset, image_processor, repeat=True)
    iterator = iter(endless)
    assert [[row["id"] for row in next(iterator)] for _ in range(len(epochs))] == epochs

    resumed = stream(dataset, image_processor, repeat=True)
    resumed.load_state_dict({**resumed.state_dict(), "num_batches_yielded": len(epochs) - 3})  # 3 into epoch 1
    iterator = iter(resumed)
    assert [[row["id"] for row in next(iterator)] for _ in range(3)] == epochs[-3:]


def test_split_dataset_by_node_gives_disjoint_complete_rows(dataset, image_processor):
    for num_shards in (4, 3):  # whole shards per process, and every 2nd row when shards do not divide
        per_rank = [
            sorted(index for batch in ids(stream(dataset, image_processor, num_shards=num_shards, rank=rank,
                                                 world_size=2)) for index in batch)
            for rank in range(2)
        ]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(NUM_ROWS))
        assert per_rank[0] and per_rank[1]


def test_sizes_come_from_columns_when_present(image_processor):
    # The encoded images are tiny; the size columns say they are large: batching must follow the columns.
    rows = [{"image": {"bytes": png(8, 8, i), "path": None}, "height": 300 + i, "width": 200, "n": 4}
            for i in range(8)]
    features = datasets.Features({"image": datasets.Image(), "height": datasets.Value("int64"),
                                  "width": datasets.Value("int64"), "n": datasets.Value("int64")})
    data = datasets.Dataset.from_list(rows, features=features).to_iterable_dataset()
    budget = 4 + image_processor.plan(307, 200).num_tokens
    batches = list(StreamingBucketBatches(data, image_processor, "n", max_tokens_per_batch=budget, buffer_size=8))
    assert [len(batch) for batch in batches] == [1] * 8  # from the 8x8 headers they would all fit in one

    sized = datasets.Dataset.from_list(
        [{"image": {"bytes": png(8, 8, 0), "path": None}, "image_sizes": [[300, 200]], "n": 4}],
        features=datasets.Features({"image": datasets.Image(), "image_sizes": datasets.List(datasets.List(
            datasets.Value("int64"))), "n": datasets.Value("int64")}),
    ).to_iterable_dataset()
    with pytest.raises(ValueError, match="dataset row 0: needs"):
        list(StreamingBucketBatches(sized, image_processor, "n", max_tokens_per_batch=10, buffer_size=1))


def test_misuse_is_a_clear_error(dataset, image_processor):
    with pytest.raises(TypeError, match="map-style datasets.Dataset.*to_iterable_dataset"):
        StreamingBucketBatches(dataset, image_processor, "text_tokens", batch_size=4)
    with pytest.raises(TypeError, match="got list"):
        StreamingBucketBatches([{"a": 1}], image_processor, "text_tokens", batch_size=4)
    with pytest.raises(ValueError, match="buffer_size=2 cannot hold one batch of batch_size=4"):
        stream(dataset, image_processor, buffer_size=2)
    with pytest.raises(ValueError, match="give batch_size, max_tokens_per_batch"):
        stream(dataset, image_processor, batch_size=None)
    with pytest.raises(ValueError, match="rank < world_size"):
        stream(dataset, image_processor, rank=2, world_size=2)
    with pytest.raises(ValueError, match="saved with seed=1"):
        stream(dataset, image_processor).load_state_dict({**stream(dataset, image_processor, seed=1).state_dict()})
    loader = torch.utils.data.DataLoader(stream(dataset, image_processor), batch_size=None, num_workers=1)
    with pytest.raises(ValueError, match="worker processes"):
        next(iter(loader))


# --- the trainer -----------------------------------------------------------------------------------------------


def trainer_on_stream(output_dir, processor, model, data, **overrides):
    from modeling_nanovlm import NanoVLMTrainer

    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=2e-3, logging_steps=1,
        save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return NanoVLMTrainer(model=model, args=TrainingArguments(**settings), train_dataset=data,
                          processing_class=processor, stream_buffer_size=16)


class Recorder(NanoVLMCollator):
    def __init__(self, processor):
        super().__init__(processor)
        self.seen = []

    def __call__(self, rows):
        self.seen.append([row["id"] for row in rows])
        return super().__call__(rows)


def test_trainer_trains_on_a_stream_across_epochs_and_resumes_exactly(tmp_path, processor, make_tiny_model):
    from modeling_nanovlm import NanoVLMTrainer

    torch.set_num_threads(1)
    data = make_dataset(20).to_iterable_dataset(num_shards=2)  # 5 batches of 4: 6 steps cross an epoch boundary

    def run(output_dir, resume=None):
        model = make_tiny_model()
        collator = Recorder(processor)
        args = TrainingArguments(
            output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=2e-3,
            logging_steps=1, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True,
            seed=0,
        )
        trainer = NanoVLMTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                                 processing_class=processor, stream_buffer_size=8)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, collator.seen

    trainer, seen = run(tmp_path / "full")
    assert trainer.state.global_step == 6
    assert len(seen) == 6 + 1  # the device loader reads one batch ahead
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(np.isfinite(losses))
    first_epoch = sorted(index for batch in seen[:5] for index in batch)
    assert first_epoch == list(range(20))  # the first 5 batches are one epoch: every row once

    resumed, resumed_seen = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed_seen[:2] == seen[4:6]  # steps 5 and 6 train on the same batches, across the epoch boundary
    assert resumed.state.global_step == 6
    full_weights = trainer.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, full_weights[name], msg=name)


def test_trainer_refuses_worker_processes_on_a_stream(tmp_path, processor, make_tiny_model):
    trainer = trainer_on_stream(tmp_path, processor, make_tiny_model(), make_dataset(8).to_iterable_dataset(),
                                dataloader_num_workers=2)
    with pytest.raises(ValueError, match="dataloader_num_workers=2"):
        trainer.get_train_dataloader()
