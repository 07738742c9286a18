"""BucketBatchSampler: determinism, exact coverage under accelerate's sharding, resuming, padding, token budget."""

import io
import random

import numpy as np
import pytest
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from PIL import Image
from torch.utils.data import DataLoader

import processing.image_loading as image_loading
from processing import BucketBatchSampler, ImagePlan, NanoVLMImageProcessor, bucket_key

NUM_SAMPLES = 203  # prime: no batch size or process count divides it


@pytest.fixture(scope="module")
def image_processor():
    return NanoVLMImageProcessor(max_image_tokens=256, max_image_size=1536)


def mixed_sizes(num_samples, seed=0):
    """Image sizes from thumbnails to 2k, tall to wide, one sample with two images, two text-only; text 5-120."""
    rng = random.Random(seed)
    image_sizes, text_lengths = [], []
    for index in range(num_samples):
        long_side = rng.choice([96, 200, 384, 640, 900, 1300, 2000])
        aspect = rng.choice([0.33, 0.6, 1.0, 1.0, 1.5, 2.5])
        height, width = (long_side, int(long_side * aspect)) if aspect < 1 else (int(long_side / aspect), long_side)
        if index == 7:
            image_sizes.append([(height, width), (300, 300)])
        elif index in (11, 12):
            image_sizes.append([])
        else:
            image_sizes.append((height, width))
        text_lengths.append(rng.randint(5, 120))
    return image_sizes, text_lengths


@pytest.fixture(scope="module")
def mixed_set():
    return mixed_sizes(NUM_SAMPLES)


def make_sampler(mixed_set, image_processor, **kwargs):
    image_sizes, text_lengths = mixed_set
    return BucketBatchSampler(image_sizes, text_lengths, image_processor, **kwargs)


def shard_batches(make, num_processes, even_batches=True, epoch=0):
    """The batches each process gets from accelerate's `prepare_data_loader` (batch-sharding, the default)."""
    per_process = []
    for process_index in range(num_processes):
        sampler = make()  # each process builds its own sampler, as in real training
        sampler.set_epoch(epoch)
        loader = DataLoader(list(range(NUM_SAMPLES)), batch_sampler=sampler, collate_fn=list)
        loader = prepare_data_loader(
            loader, num_processes=num_processes, process_index=process_index, put_on_device=False,
            even_batches=even_batches,
        )
        per_process.append(list(loader))
    return per_process


def padding_fraction(batches, lengths):
    """Padding tokens / all tokens of the padded LM batches (text + image tokens per row)."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / padded


# --- determinism ----------------------------------------------------------------------------------------


def test_order_is_a_function_of_seed_and_epoch(mixed_set, image_processor):
    first = make_sampler(mixed_set, image_processor, batch_size=8, seed=3)
    second = make_sampler(mixed_set, image_processor, batch_size=8, seed=3)
    for epoch in (0, 1, 5):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        assert list(first) == list(second)
    assert first.batches(0) != first.batches(1)  # a new order every epoch
    assert sorted(map(sorted, first.batches(0))) != sorted(map(sorted, first.batches(1)))  # and new batches
    assert make_sampler(mixed_set, image_processor, batch_size=8, seed=4).batches(0) != first.batches(0)


@pytest.mark.parametrize("options", [{"batch_size": 8}, {"max_tokens_per_batch": 2048}])
def test_every_epoch_has_the_same_number_of_batches(mixed_set, image_processor, options):
    sampler = make_sampler(mixed_set, image_processor, **options, num_replicas=3)
    assert {len(sampler.batches(epoch)) for epoch in range(6)} == {len(sampler)}


# --- exact coverage under accelerate -------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"batch_size": 8}, {"max_tokens_per_batch": 2048}], ids=["fixed", "tokens"])
@pytest.mark.parametrize("num_processes", [1, 3])
@pytest.mark.parametrize("even_batches", [True, False])
def test_every_sample_exactly_once_per_epoch_on_each_process_count(
    mixed_set, image_processor, options, num_processes, even_batches
):
    def make():
        return make_sampler(mixed_set, image_processor, **options, num_replicas=num_processes, seed=1)
    for epoch in (0, 1):
        per_process = shard_batches(make, num_processes, even_batches, epoch)
        assert len({len(batches) for batches in per_process}) == 1  # equal step counts: no DDP hang
        assert len(per_process[0]) == len(make()) // num_processes
        seen = [index for batches in per_process for batch in batches for index in batch]
        assert sorted(seen) == list(range(NUM_SAMPLES))


def test_without_num_replicas_accelerate_repeats_samples_to_even_out(mixed_set, image_processor):
    # What the module docstring warns about: a sampler built for one process, sharded over three.
    def make():
        return make_sampler(mixed_set, image_processor, batch_size=8)
    seen = [index for batches in shard_batches(make, 3) for batch in batches for index in batch]
    assert set(seen) == set(range(NUM_SAMPLES)) and len(seen) > NUM_SAMPLES


def test_batch_size_is_exposed_only_when_every_batch_but_the_last_is_full(mixed_set, image_processor):
    fixed = make_sampler(mixed_set, image_processor, batch_size=8)
    assert fixed.batch_size == 8
    sizes = [len(batch) for batch in fixed.batches(0)]
    assert all(size == 8 for size in sizes[:-1]) and len(sizes) == -(-NUM_SAMPLES // 8)
    assert make_sampler(mixed_set, image_processor, batch_size=8, num_replicas=3).batch_size is None
    assert make_sampler(mixed_set, image_processor, max_tokens_per_batch=2048).batch_size is None


def test_too_few_samples_for_the_processes_is_an_error(image_processor):
    with pytest.raises(ValueError, match="processes"):
        BucketBatchSampler([(64, 64)] * 2, [5, 5], image_processor, batch_size=1, num_replicas=3)


# --- resuming ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"batch_size": 8}, {"max_tokens_per_batch": 2048}])
def test_resume_mid_epoch_gives_the_remaining_batches(mixed_set, image_processor, options):
    sampler = make_sampler(mixed_set, image_processor, **options, seed=7)
    sampler.set_epoch(2)
    full_epoch = sampler.batches(2)
    iterator = iter(sampler)
    done = [next(iterator) for _ in range(5)]
    state = sampler.state_dict()

    resumed = make_sampler(mixed_set, image_processor, **options, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a training loop does at epoch start: keeps the resume point
    assert len(resumed) == len(full_epoch) - 5
    assert done + list(resumed) == full_epoch
    assert len(resumed) == len(full_epoch)  # the skip applies to one iteration only
    resumed.set_epoch(3)
    assert list(resumed) == sampler.batches(3)


def test_accelerate_skip_first_batches_resumes_each_process_exactly(mixed_set, image_processor):
    # The Trainer's resume path: skip the batches this process already trained on in the current epoch.
    def make():
        return make_sampler(mixed_set, image_processor, max_tokens_per_batch=2048, num_replicas=3, seed=2)
    for process_index, batches in enumerate(shard_batches(make, 3, epoch=1)):
        sampler = make()
        sampler.set_epoch(1)
        loader = DataLoader(list(range(NUM_SAMPLES)), batch_sampler=sampler, collate_fn=list)
        loader = prepare_data_loader(loader, num_processes=3, process_index=process_index, put_on_device=False)
        assert list(skip_first_batches(loader, 4)) == batches[4:]


# --- re-planning: data whose image sizes change between epochs --------------------------------------------


def epoch_sizes(epoch):
    """Epoch `epoch`'s image sizes of the same NUM_SAMPLES samples (new random sizes each epoch)."""
    return mixed_sizes(NUM_SAMPLES, seed=100 + epoch)[0]


@pytest.mark.parametrize("options", [{"batch_size": 8}, {"batch_size": 8, "budgets": [256, 64, 16]}])
def test_replan_plans_new_sizes_as_a_new_sampler_would(mixed_set, image_processor, options):
    sampler = make_sampler(mixed_set, image_processor, **options, seed=5)
    sampler.set_epoch(3)
    sampler.replan(epoch_sizes(3))
    fresh = BucketBatchSampler(epoch_sizes(3), mixed_set[1], image_processor, **options, seed=5)
    assert sampler.epoch == 3 and sampler.keys == fresh.keys and sampler.keys != make_sampler(
        mixed_set, image_processor, **options).keys  # the buckets changed
    assert sampler.lengths == fresh.lengths and sampler.lengths_at(64) == fresh.lengths_at(64)
    assert sampler.batches(3) == fresh.batches(3) and sampler.batch_budgets(3) == fresh.batch_budgets(3)
    sampler.replan(*mixed_set)  # back to the first sizes: the first batches (deterministic)
    assert sampler.batches(3) == make_sampler(mixed_set, image_processor, **options, seed=5).batches(3)


def test_replan_can_change_text_lengths_and_refuses_another_sample_count(mixed_set, image_processor):
    sampler = make_sampler(mixed_set, image_processor, batch_size=8)
    longer = [length + 40 for length in mixed_set[1]]
    sampler.replan(mixed_set[0], longer)
    assert sampler.lengths == BucketBatchSampler(mixed_set[0], longer, image_processor, batch_size=8).lengths
    with pytest.raises(ValueError, match=f"all {NUM_SAMPLES} samples, got {NUM_SAMPLES - 1}"):
        sampler.replan(mixed_set[0][:-1])


@pytest.mark.parametrize("options", [{"batch_size": 8}, {"batch_size": 8, "budgets": [256, 64, 16]}])
@pytest.mark.parametrize("num_replicas", [1, 3])
def test_sizes_for_epoch_keeps_the_batch_count_and_covers_every_sample(image_processor, options, num_replicas):
    sampler = BucketBatchSampler(epoch_sizes(0), mixed_sizes(NUM_SAMPLES)[1], image_processor, **options,
                                 num_replicas=num_replicas, sizes_for_epoch=epoch_sizes)
    first_keys = list(sampler.keys)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-NUM_SAMPLES // 8) + (num_replicas == 3)  # one batch halved
        indices = [key if isinstance(key, int) else key.index for batch in batches for key in batch]
        assert sorted(indices) == list(range(NUM_SAMPLES))
        assert sampler.keys == BucketBatchSampler(epoch_sizes(epoch), mixed_sizes(NUM_SAMPLES)[1], image_processor,
                                                  batch_size=8).keys  # this epoch's sizes are planned
    assert sampler.keys != first_keys


@pytest.mark.parametrize("resume", ["sizes_for_epoch", "replan"])
def test_resume_mid_epoch_after_a_replan_is_exact(image_processor, resume):
    text_lengths = mixed_sizes(NUM_SAMPLES)[1]
    sampler = BucketBatchSampler(epoch_sizes(0), text_lengths, image_processor, batch_size=8, seed=7,
                                 budgets=[256, 64], sizes_for_epoch=epoch_sizes)
    sampler.set_epoch(2)
    full_epoch = list(sampler)
    iterator = iter(sampler)
    done = [next(iterator) for _ in range(5)]
    state = sampler.state_dict()

    if resume == "sizes_for_epoch":  # a new process: built from epoch 0's sizes, resumed into epoch 2
        resumed = BucketBatchSampler(epoch_sizes(0), text_lengths, image_processor, batch_size=8, seed=7,
                                     budgets=[256, 64], sizes_for_epoch=epoch_sizes)
        resumed.load_state_dict(state)
    else:
        resumed = BucketBatchSampler(epoch_sizes(0), text_lengths, image_processor, batch_size=8, seed=7,
                                     budgets=[256, 64])
        resumed.load_state_dict(state)
        resumed.replan(epoch_sizes(2))  # keeps the resume point
    resumed.set_epoch(2)  # what a training loop does at epoch start: keeps the resume point
    assert len(resumed) == len(full_epoch) - 5
    assert done + list(resumed) == full_epoch
    assert resumed.lengths == sampler.lengths


def test_a_replan_that_would_change_the_batch_count_is_refused(image_processor):
    small = [(64, 64)] * 40
    sampler = BucketBatchSampler(small, [10] * 40, image_processor, max_tokens_per_batch=2048)
    before = (len(sampler), sampler.lengths, sampler.batches(0))
    with pytest.raises(ValueError, match="number of batches per epoch from 1 to"):
        sampler.replan([(1024, 1024)] * 40)
    assert (len(sampler), sampler.lengths, sampler.batches(0)) == before  # left as it was
    with pytest.raises(ValueError, match="more than max_tokens_per_batch"):
        sampler.replan(small, [10] * 39 + [5000])
    assert sampler.lengths == before[1]


# --- batch quality -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"batch_size": 8}, {"max_tokens_per_batch": 2048}], ids=["fixed", "tokens"])
def test_bucketing_pads_far_less_than_random_batches(image_processor, options):
    # Enough samples that most buckets fill several batches (a small set is mostly bucket leftovers).
    large_set = mixed_sizes(3000)
    sampler = BucketBatchSampler(*large_set, image_processor, **options)
    batches = sampler.batches(0)
    indices = list(range(3000))
    random.Random(0).shuffle(indices)
    mean_size = round(3000 / len(batches))
    random_batches = [indices[start : start + mean_size] for start in range(0, 3000, mean_size)]

    bucketed = padding_fraction(batches, sampler.lengths)
    random_padding = padding_fraction(random_batches, sampler.lengths)
    assert bucketed < 0.1 and bucketed < random_padding / 4, (bucketed, random_padding)

    def distinct_shapes(batches):
        return np.mean([len({shape for i in batch for shape in sampler.shapes[i]}) for batch in batches])

    assert distinct_shapes(batches) < distinct_shapes(random_batches) / 2


def test_every_batch_fits_the_token_budget(mixed_set, image_processor):
    budget = 2048
    sampler = make_sampler(mixed_set, image_processor, max_tokens_per_batch=budget, batch_size=12, num_replicas=3)
    for epoch in range(3):
        for batch in sampler.batches(epoch):
            assert len(batch) * max(sampler.lengths[i] for i in batch) <= budget
            assert len(batch) <= 12
    assert max(map(len, sampler.batches(0))) > 4  # short samples do share batches


def test_a_sample_over_the_token_budget_is_an_error(image_processor):
    with pytest.raises(ValueError, match="sample 1 needs"):
        BucketBatchSampler([(64, 64), (1500, 1500)], [5, 5], image_processor, max_tokens_per_batch=100)


def test_lengths_and_buckets_come_from_the_image_processor_plan(image_processor):
    sampler = BucketBatchSampler(
        [(600, 1200), [(100, 100), (2000, 500)], []], [10, 20, 30], image_processor, batch_size=2
    )
    plan = image_processor.plan(600, 1200)
    assert sampler.lengths[0] == 10 + plan.num_tokens
    tokens = image_processor.num_image_tokens
    assert sampler.lengths[1] == 20 + tokens(100, 100) + tokens(2000, 500)
    assert sampler.lengths[2] == 30 and sampler.keys[2] == ()
    assert sampler.keys[0] == (bucket_key(plan),)


def test_bucket_key_reads_the_resized_long_side_and_aspect():
    def plan(height, width):
        return ImagePlan(height, width, height // 16, width // 16, 1, height // 16, width // 16)

    # size edges 512 / 768 / 1024 / 1536 (upper edge inclusive); aspect edges 0.5 / 0.8 / 1.25 / 2.0 on width / height
    assert bucket_key(plan(512, 512)) == (0, 2)
    assert bucket_key(plan(480, 960)) == (2, 3)
    assert bucket_key(plan(2048, 512)) == (4, 0)
    assert bucket_key(plan(640, 544)) == (1, 2)
    assert bucket_key(plan(160, 960), size_buckets=(256, 1024), aspect_ratio_edges=(1.0,)) == (1, 1)


def test_with_snapping_every_full_batch_has_one_image_shape():
    snapping = NanoVLMImageProcessor(
        max_image_tokens=256, max_image_size=1536, snap_sizes=[256, 512, 1024], snap_aspect_ratios=[0.5, 1.0, 2.0]
    )
    image_sizes, text_lengths = mixed_sizes(1000)
    sampler = BucketBatchSampler(image_sizes, text_lengths, snapping, batch_size=8)
    single_image = [batch for batch in sampler.batches(0) if all(len(sampler.shapes[i]) == 1 for i in batch)]
    shapes_per_batch = [len({sampler.shapes[i] for i in batch}) for batch in single_image]
    # only the batches pooled from bucket leftovers mix shapes: at most one per bucket
    assert sum(count > 1 for count in shapes_per_batch) <= len(set(sampler.keys))
    assert shapes_per_batch.count(1) > 0.8 * len(shapes_per_batch)


# --- building from a dataset ---------------------------------------------------------------------------


def jpeg_bytes(height, width):
    # JPEG, not PNG: for a PNG, PIL's getexif() (which image_size calls) loads the pixels to look for a late eXIf chunk.
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 10, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_from_dataset_reads_sizes_from_headers_without_decoding(image_processor, monkeypatch):
    datasets = pytest.importorskip("datasets")
    sizes = [(40, 300), (512, 128), (90, 90), (700, 650)]
    rows = {
        "image": [{"bytes": jpeg_bytes(h, w), "path": None} for h, w in sizes],
        "prompt": ["a", "bb", "ccc", "dddd"],
    }
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(rows, features=features)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(image_loading, "load_image", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    seen_rows = []
    def text_length(row):
        return seen_rows.append(row) or len(row["prompt"])
    sampler = BucketBatchSampler.from_dataset(dataset, image_processor, text_length, batch_size=2)
    expected = BucketBatchSampler(sizes, [1, 2, 3, 4], image_processor, batch_size=2)
    assert sampler.lengths == expected.lengths and sampler.keys == expected.keys
    assert all("image" not in row for row in seen_rows)


def test_from_dataset_accepts_a_list_of_rows_with_image_lists(image_processor):
    rows = [
        {"images": [Image.new("RGB", (300, 40)), Image.new("RGB", (64, 64))], "n": 3},
        {"images": [], "n": 4},
        {"images": [Image.new("RGB", (128, 512))], "n": 5},
    ]
    sampler = BucketBatchSampler.from_dataset(rows, image_processor, "n", batch_size=2)
    expected = BucketBatchSampler([[(40, 300), (64, 64)], [], (512, 128)], [3, 4, 5], image_processor, batch_size=2)
    assert sampler.lengths == expected.lengths
    with pytest.raises(ValueError, match="image_column"):
        BucketBatchSampler.from_dataset(rows, image_processor, "n", image_column="picture", batch_size=2)
