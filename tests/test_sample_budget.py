"""One budget per prompt: `max_image_tokens_per_sample`, shared by the images of each sample (`plan_images`).

The plan of a sample's images is a pure function of their sizes and the settings; the processor, the collator, the
samplers and the model all read it, so their counts agree exactly.
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from processing import BucketBatchSampler, NanoVLMCollator, NanoVLMImageProcessor, PlannedRows, plan_image, plan_images

pytestmark = pytest.mark.usefixtures("one_thread")
PER_SAMPLE = "max_image_tokens_per_sample"

SETTINGS = [  # plan settings the properties are checked under
    dict(shuffle_factors=(1, 2, 4), max_image_size=1024),
    dict(shuffle_factors=(2, 4), max_image_size=384),
    dict(shuffle_factors=(2,), max_image_size=512),
    dict(shuffle_factors=(1, 3), max_image_size=2048, snap_sizes=(256, 512), snap_aspect_ratios=(0.5, 1.0, 2.0)),
]
sizes_strategy = st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=16)


def tokens(plans):
    return [plan.num_tokens for plan in plans]


def reference(sizes, budget, max_image_tokens, **setting):
    """The rule written the slow, obvious way: walk the cap vectors (c+1 for the first j images, c for the rest)
    upward one step at a time and keep the last whose plans fit."""
    n, best = len(sizes), None
    for k in range(n, n * max_image_tokens + 1):
        caps = [k // n + (i < k % n) for i in range(n)]
        plans = [plan_image(h, w, max_image_tokens=cap, **setting) for (h, w), cap in zip(sizes, caps)]
        if sum(tokens(plans)) > budget:
            break
        best = plans
    return best


# --- the rule ----------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 5000), width=st.integers(1, 5000),
       caps=st.tuples(st.integers(1, 1100), st.integers(1, 1100)), setting=st.sampled_from(SETTINGS))
def test_one_image_plan_is_monotone_in_its_cap(height, width, caps, setting):
    """What the water-filling's binary search relies on: a larger cap never gives an image fewer tokens."""
    low, high = sorted(caps)
    assert (plan_image(height, width, max_image_tokens=low, **setting).num_tokens
            <= plan_image(height, width, max_image_tokens=high, **setting).num_tokens)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=sizes_strategy, data=st.data(), max_image_tokens=st.integers(1, 48), setting=st.sampled_from(SETTINGS))
def test_sample_plan_follows_the_rule(sizes, data, max_image_tokens, setting):
    budget = data.draw(st.integers(len(sizes), 16 * max_image_tokens + 20))
    plans = plan_images(sizes, max_image_tokens_per_sample=budget, max_image_tokens=max_image_tokens, **setting)
    assert sum(tokens(plans)) <= budget
    assert all(1 <= count <= max_image_tokens for count in tokens(plans))
    assert plans == reference(sizes, budget, max_image_tokens, **setting)
    # every image gets at least what an equal cap for all (plain water-filling) gives it
    common = max(c for c in range(1, max_image_tokens + 1)
                 if sum(plan_image(h, w, max_image_tokens=c, **setting).num_tokens for h, w in sizes) <= budget)
    assert all(plan.num_tokens >= plan_image(h, w, max_image_tokens=common, **setting).num_tokens
               for plan, (h, w) in zip(plans, sizes))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=sizes_strategy, budgets=st.tuples(st.integers(16, 3000), st.integers(16, 3000)),
       max_image_tokens=st.sampled_from([64, 256, 1024]), setting=st.sampled_from(SETTINGS))
def test_a_larger_sample_budget_never_gives_an_image_fewer_tokens(sizes, budgets, max_image_tokens, setting):
    low, high = sorted(budgets)
    at_low = plan_images(sizes, max_image_tokens_per_sample=low, max_image_tokens=max_image_tokens, **setting)
    at_high = plan_images(sizes, max_image_tokens_per_sample=high, max_image_tokens=max_image_tokens, **setting)
    assert sum(tokens(at_low)) <= low and sum(tokens(at_high)) <= high
    assert all(a <= b for a, b in zip(tokens(at_low), tokens(at_high)))


def test_no_sample_budget_plans_every_image_alone_and_a_loose_one_changes_nothing():
    sizes = [(480, 640), (100, 100), (2048, 512)]
    alone = [plan_image(h, w, max_image_tokens=256) for h, w in sizes]
    assert plan_images(sizes, max_image_tokens=256) == alone
    assert plan_images(sizes, max_image_tokens=256, max_image_tokens_per_sample=10_000) == alone
    shared = plan_images(sizes, max_image_tokens=256, max_image_tokens_per_sample=256)
    assert sum(tokens(shared)) <= 256 < sum(tokens(alone))
    assert plan_images([], max_image_tokens_per_sample=5) == []


def test_a_small_image_leaves_its_share_to_the_others():
    """Three images, 300 tokens: the 64x64 one needs 4 tokens at factor 2, so the two photos get ~148 each,
    not 100."""
    ip = NanoVLMImageProcessor(max_image_tokens=1024, shuffle_factors=(2, 4))
    counts = ip.num_image_tokens_per_sample([(64, 64), (768, 1024), (1024, 768)], max_image_tokens_per_sample=300)
    assert counts[0] == 4 and min(counts[1:]) > 120 and sum(counts) <= 300


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget, message", [
    (0, "must be >= 1, got 0"),
    (-5, "must be >= 1, got -5"),
    (2, "max_image_tokens_per_sample=2 cannot give each of its 3 images one token"),
    (2.5, "must be a positive integer"),
    ("256", "must be a positive integer"),
    (True, "must be a positive integer"),
])
def test_bad_sample_budgets_are_clear_errors(budget, message):
    ip = NanoVLMImageProcessor(max_image_tokens=64, max_image_size=256)
    images = [np.zeros((64, 64, 3), np.uint8)] * 3
    with pytest.raises(ValueError, match=message):
        ip.plan_sample([(64, 64)] * 3, max_image_tokens_per_sample=budget)
    named = "sample 1 \\(3 images\\)" if budget == 2 else "sample 0 \\(1 image\\)"  # the first that cannot fit
    with pytest.raises(ValueError, match=f"{named}: .*{message}"):
        ip([[images[0]], images], max_image_tokens_per_sample=budget)
    if isinstance(budget, int) and budget < 1:
        with pytest.raises(ValueError, match=message):
            NanoVLMImageProcessor(max_image_tokens_per_sample=budget)


def test_processor_names_the_sample_and_the_counts(processor):
    images = [np.zeros((64, 64, 3), np.uint8)] * 4
    with pytest.raises(ValueError, match=r"sample 1 \(3 images\): max_image_tokens_per_sample=2 cannot give each "
                                         r"of its 3 images one token; raise it to at least 3"):
        processor(text=["<image> a", "<image><image><image> b"], images=[images[:1], images[1:]],
                  max_image_tokens_per_sample=2)


def test_a_fixed_count_per_image_that_cannot_fit_is_an_error():
    ip = NanoVLMImageProcessor(connector="perceiver", perceiver_latents=16, max_image_tokens=64)
    assert ip.num_image_tokens_per_sample([(64, 64)] * 3, max_image_tokens_per_sample=48) == [16, 16, 16]
    with pytest.raises(ValueError, match="Perceiver connector gives 16 tokens per image, so 3 images need 48, more "
                                         "than max_image_tokens_per_sample=40"):
        ip.plan_sample([(64, 64)] * 3, max_image_tokens_per_sample=40)


def test_sampler_refuses_drawn_sample_budgets_beside_a_fixed_one_and_too_small_ones():
    ip = NanoVLMImageProcessor(max_image_tokens=64, max_image_size=256)
    sizes, lengths = [[(64, 64)] * 3, (80, 90)], [5, 5]
    with pytest.raises(ValueError, match="plan_overrides sets max_image_tokens_per_sample=100 and budgets are given"):
        BucketBatchSampler(sizes, lengths, ip, batch_size=1, budgets=[64], budget_setting=PER_SAMPLE,
                           plan_overrides={PER_SAMPLE: 100})
    with pytest.raises(ValueError, match="sample 0: max_image_tokens_per_sample=2 cannot give each of its 3 images"):
        BucketBatchSampler(sizes, lengths, ip, batch_size=1, budgets=[64, 2], budget_setting=PER_SAMPLE)
    with pytest.raises(ValueError, match="budget_setting must be one of"):
        BucketBatchSampler(sizes, lengths, ip, batch_size=1, budgets=[64], budget_setting="max_tokens")
    with pytest.raises(ValueError, match="image tokens per sample"):
        BucketBatchSampler(sizes, lengths, ip, batch_size=1, budgets=[0], budget_setting=PER_SAMPLE)


# --- everywhere the plan is used -------------------------------------------------------------------------------


def random_images(sizes, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


SAMPLES = [[(200, 300), (64, 64), (256, 256)], [(300, 120)], [(128, 384), (384, 128), (96, 96), (250, 250)]]


def test_processor_shares_the_budget_and_the_model_answers(processor, tiny_model):
    """The issue's check: at most 256 image tokens per sample, every image planned from its own size."""
    processor.image_processor.max_image_tokens = 1024  # so that only the per-sample budget binds
    images = [random_images(sizes, seed) for seed, sizes in enumerate(SAMPLES)]
    text = ["<image>" * len(sizes) + f" question {i}" for i, sizes in enumerate(SAMPLES)]
    batch = processor(text=text, images=images, max_image_tokens_per_sample=256, return_tensors="pt")
    expected = [processor.image_processor.num_image_tokens_per_sample(sizes, max_image_tokens_per_sample=256)
                for sizes in SAMPLES]
    placed = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert placed == [sum(counts) for counts in expected] and max(placed) <= 256
    assert [h * w for h, w in batch["image_token_hw"].tolist()] == [c for counts in expected for c in counts]
    alone = processor(text=text, images=images, return_tensors="pt")
    assert (alone["input_ids"] == processor.image_token_id).sum(1).tolist()[0] > 256  # the budget did bind
    with torch.no_grad():
        ids = tiny_model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert ids.shape[0] == len(SAMPLES)


def test_batch_and_alone_logits_agree_under_a_sample_budget(processor, tiny_model):
    images = [random_images(sizes, 10 + seed) for seed, sizes in enumerate(SAMPLES)]
    text = ["<image>" * len(sizes) + f" what is shown {i}?" for i, sizes in enumerate(SAMPLES)]
    kwargs = dict(max_image_tokens_per_sample=100, padding_side="right", return_tensors="pt")
    batch = processor(text=text, images=images, **kwargs)
    with torch.no_grad():
        together = tiny_model(**batch).logits
        for index in range(len(SAMPLES)):
            alone = processor(text=[text[index]], images=[images[index]], **kwargs)
            logits = tiny_model(**alone).logits[0]
            torch.testing.assert_close(together[index, : logits.shape[0]], logits, rtol=1e-4, atol=1e-4)


def multi_image_rows(count, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        sizes = [(int(rng.integers(64, 320)), int(rng.integers(64, 320))) for _ in range(int(rng.integers(1, 5)))]
        images = random_images(sizes, seed * 1000 + index)
        if index % 2:  # the Cauldron schema
            rows.append({"images": images, "texts": [{"user": "Which digits are shown, in order?",
                                                      "assistant": " ".join("7" * len(sizes))}]})
        else:
            rows.append({"images": images, "prompt": "Which digits are shown, in order?", "answer": "7 3 1"})
    return rows


def test_sampler_collator_and_model_agree_exactly_for_multi_image_samples(processor, tiny_model):
    processor.image_processor.max_image_tokens = 96
    rows = multi_image_rows(10)
    collator = NanoVLMCollator(processor, plan_overrides={"max_image_tokens_per_sample": 128})
    sampler = BucketBatchSampler.from_dataset(rows, processor.image_processor, collator.text_length, batch_size=3,
                                              plan_overrides=collator.plan_overrides)
    assert any(len(row["images"]) >= 3 for row in rows)
    for keys in sampler.batches(0):
        batch = collator([rows[i] for i in keys])
        assert batch["attention_mask"].sum(1).tolist() == [sampler.lengths[i] for i in keys]
        image_tokens = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
        assert image_tokens == [sum(processor.image_processor.num_image_tokens_per_sample(
            [image.shape[:2] for image in rows[i]["images"]], max_image_tokens_per_sample=128)) for i in keys]
        assert max(image_tokens) <= 128
        with torch.no_grad():
            features = tiny_model.get_image_features(batch["pixel_values"], batch["image_grid_hw"],
                                                     batch["image_token_hw"], batch["image_shuffle_factor"])
        assert features.shape[0] == sum(image_tokens)


def test_drawn_sample_budgets_reach_the_collator_with_exact_lengths(processor):
    processor.image_processor.max_image_tokens = 96
    rows = multi_image_rows(12, seed=1)
    collator = NanoVLMCollator(processor)
    budgets = [192, 96, 48]
    sampler = BucketBatchSampler.from_dataset(rows, processor.image_processor, collator.text_length, batch_size=3,
                                              budgets=budgets, budget_setting="max_image_tokens_per_sample")
    loader = DataLoader(PlannedRows(rows), batch_sampler=sampler, collate_fn=collator)
    drawn = sampler.batch_budgets(0)
    assert set(drawn) == set(budgets)
    for batch, keys, budget in zip(loader, sampler.batches(0), drawn):
        exact = sampler.lengths_at(budget)
        assert batch["attention_mask"].sum(1).tolist() == [exact[i] for i in keys]
        assert max((batch["input_ids"] == processor.image_token_id).sum(1).tolist()) <= budget
    # the lengths at the largest budget bound those at every other (what batching relies on)
    assert all(a >= b >= c for a, b, c in zip(*(sampler.lengths_at(budget) for budget in budgets)))


def test_streaming_batches_plan_a_rows_images_together(processor):
    datasets = pytest.importorskip("datasets")
    from processing import StreamingBucketBatches

    processor.image_processor.max_image_tokens = 96
    sizes = [[(200, 300), (64, 64), (256, 256)], [(100, 90)], [(300, 300), (310, 280)]]
    rows = [{"id": i, "image_sizes": [list(s) for s in row], "images": [b"unused"] * len(row), "text_tokens": 9}
            for i, row in enumerate(sizes)]
    stream = StreamingBucketBatches(datasets.Dataset.from_list(rows).to_iterable_dataset(), processor.image_processor,
                                    "text_tokens", batch_size=1, plan_overrides={"max_image_tokens_per_sample": 100},
                                    shuffle=False)
    rng = np.random.default_rng(0)
    for row, image_sizes in zip(rows, sizes):
        entry = stream.measure(dict(row), row["id"], rng)
        assert entry.length == 9 + sum(processor.image_processor.num_image_tokens_per_sample(
            image_sizes, max_image_tokens_per_sample=100))


def test_trainer_takes_per_sample_budgets(tmp_path, processor, make_tiny_model):
    from transformers import TrainingArguments

    from modeling_nanovlm import NanoVLMTrainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True)
    rows = multi_image_rows(4, seed=2)
    model = make_tiny_model()
    with pytest.raises(ValueError, match="not both"):
        NanoVLMTrainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                       image_token_budgets=[64], image_token_budgets_per_sample=[128])
    trainer = NanoVLMTrainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                             image_token_budgets_per_sample=[128, 32])
    sampler = trainer.build_train_batch_sampler()
    assert sampler.budget_setting == "max_image_tokens_per_sample" and set(sampler.budgets) == {128, 32}
    assert {key.plan["max_image_tokens_per_sample"] for batch in sampler for key in batch} <= {128, 32}


def test_sample_budget_is_saved_and_loaded(tmp_path):
    ip = NanoVLMImageProcessor(max_image_tokens=144, max_image_tokens_per_sample=288)
    ip.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["max_image_tokens_per_sample"] == 288
    loaded = NanoVLMImageProcessor.from_pretrained(tmp_path)
    sizes = [(400, 500), (300, 200), (512, 512)]
    assert loaded.num_image_tokens_per_sample(sizes) == ip.num_image_tokens_per_sample(sizes)
    assert sum(loaded.num_image_tokens_per_sample(sizes)) <= 288
    # a per-call override wins over the saved one
    assert sum(loaded.num_image_tokens_per_sample(sizes, max_image_tokens_per_sample=64)) <= 64


def test_visualize_plan_draws_a_prompts_images_with_their_shares(tmp_path):
    import importlib.util
    from pathlib import Path

    from PIL import Image

    path = Path(__file__).resolve().parents[1] / "examples" / "visualize_plan.py"
    spec = importlib.util.spec_from_file_location("visualize_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sources = []
    for index, (h, w) in enumerate([(200, 300), (64, 64), (300, 150)]):
        sources.append(tmp_path / f"image{index}.png")
        Image.fromarray(random_images([(h, w)], index)[0]).save(sources[-1])
    out = tmp_path / "sample.png"
    plans = module.main([*map(str, sources), "--max_image_tokens", "64", "--max_image_tokens_per_sample", "60",
                         "--out", str(out)])
    assert tokens(plans) == NanoVLMImageProcessor(max_image_tokens=64).num_image_tokens_per_sample(
        [(200, 300), (64, 64), (300, 150)], max_image_tokens_per_sample=60)
    assert sum(tokens(plans)) <= 60
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 300
