"""The token plan: properties over thousands of sizes, the seed's examples as a table, and the plan's
agreement with what the processor places in `input_ids` and the features the model produces."""

import importlib.util
import math
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing import ImageInputError, ImagePlan, NanoVLMImageProcessor, NanoVLMProcessor, plan_image

REPO = Path(__file__).resolve().parents[1]

# (patch_size, max_image_size, shuffle_factors) combinations the property checks run under.
SETTINGS = [
    (16, 2048, (1, 2, 4)),  # the defaults
    (14, 2048, (1, 2, 4)),
    (16, 1024, (1, 2)),
    (16, 500, (2, 3)),  # a max size that is no multiple of any step
    (16, 2048, (1,)),
    (16, 256, (4,)),
]
PRIMES = [2, 3, 5, 7, 13, 17, 31, 61, 127, 257, 509, 1021, 2039, 4093, 7919, 9973]
SPECIAL_SIZES = [
    (1, 1), (1, 10000), (10000, 1), (10000, 10000), (1, 2), (2, 1), (15, 15), (16, 16), (17, 17), (31, 33),
    (3, 9000), (9000, 3), (1, 4096), (4096, 1), (7919, 13), (13, 7919), (9973, 9973), (2047, 2049), (2048, 2048),
    (768, 768), (1024, 1024), (480, 640), (640, 480), (1080, 1920), (1920, 1080), (100, 10000), (10000, 100),
]
BUDGETS = [1, 2, 3, 4, 7, 16, 63, 64, 100, 255, 256, 1000, 1024, 4096]


# --- an independent reference for the plan rules (docs/architecture.md) ------------------------------


def nearest_multiples(side: int, scale: Fraction, step: int, max_size: int) -> set[int]:
    """The multiples of `step` nearest to side * scale (both of them on a tie), clamped to [step, max_size]."""
    target = side * scale
    below = math.floor(target / step) * step
    above = below + step
    if abs((target - below) - (above - target)) <= Fraction(1, 10**6):
        candidates = {below, above}
    else:
        candidates = {below if target - below < above - target else above}
    largest = (max_size // step) * step
    return {min(max(step, c), largest) for c in candidates}


def reference_fits(height, width, budget, patch, max_size, s) -> tuple[bool, bool]:
    """(some rounding fits the budget, every rounding fits) for factor s, by brute force over the roundings."""
    scale = min(Fraction(1), Fraction(max_size, max(height, width)))
    step = patch * s
    fits = [
        (h // step) * (w // step) <= budget
        for h in nearest_multiples(height, scale, step, max_size)
        for w in nearest_multiples(width, scale, step, max_size)
    ]
    return any(fits), all(fits)


def check_plan(height, width, budget, patch=16, max_size=2048, factors=(1, 2, 4)) -> ImagePlan:
    plan = plan_image(
        height, width, patch_size=patch, max_image_tokens=budget, max_image_size=max_size, shuffle_factors=factors
    )
    where = f"{height}x{width} budget={budget} patch={patch} max_size={max_size} factors={factors}: {plan}"
    s = plan.shuffle_factor
    step = patch * s
    # the budget holds, and even tiny images get a token
    assert 1 <= plan.num_tokens <= budget, where
    assert plan.token_height >= 1 and plan.token_width >= 1, where
    # the grid is the resized image in patches, each side a multiple of patch * s, the long side capped
    assert plan.resized_height % step == 0 and plan.resized_width % step == 0, where
    assert (plan.grid_height, plan.grid_width) == (plan.resized_height // patch, plan.resized_width // patch), where
    assert max(plan.resized_height, plan.resized_width) <= max_size, where
    # aspect kept: at most one rounding step away from the scaled side
    scale = min(1.0, max_size / max(height, width))
    assert abs(plan.resized_height - height * scale) <= step, where
    assert abs(plan.resized_width - width * scale) <= step, where
    # pooling never grows the grid; unpooled plans use the shuffled grid as it is
    assert plan.token_height * s <= plan.grid_height and plan.token_width * s <= plan.grid_width, where
    unpooled = (plan.grid_height // s) * (plan.grid_width // s)
    if plan.pooled:
        assert s == max(factors) and unpooled > budget, where
        assert plan.num_tokens >= budget / 4, where  # pooled to the largest grid that fits, not far below
    else:
        assert plan.num_tokens == unpooled, where
    # the smallest allowed s that fits is chosen (brute force over the factors and the roundings)
    for smaller in sorted(factors):
        if smaller == s:
            break
        assert not reference_fits(height, width, budget, patch, max_size, smaller)[1], f"s={smaller} fits: {where}"
    if not plan.pooled:
        assert reference_fits(height, width, budget, patch, max_size, s)[0], where
    # deterministic
    assert plan == plan_image(
        height, width, patch_size=patch, max_image_tokens=budget, max_image_size=max_size, shuffle_factors=factors
    )
    return plan


# --- properties over thousands of sizes ------------------------------------------------------------


def random_size(rng: random.Random) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.5:  # log-uniform sides
        return tuple(max(1, int(round(math.exp(rng.uniform(0, math.log(10000)))))) for _ in range(2))
    if kind < 0.7:  # extreme aspect
        thin, long = rng.randint(1, 12), rng.randint(500, 10000)
        return (thin, long) if rng.random() < 0.5 else (long, thin)
    if kind < 0.85:  # primes
        return rng.choice(PRIMES), rng.choice(PRIMES)
    return rng.randint(1, 64), rng.randint(1, 64)  # tiny


def test_plan_properties_over_thousands_of_sizes():
    rng = random.Random(20240611)
    cases = [(h, w, b) for h, w in SPECIAL_SIZES for b in BUDGETS]
    cases += [
        (*random_size(rng), rng.choice(BUDGETS) if rng.random() < 0.5 else rng.randint(1, 5000)) for _ in range(4000)
    ]
    pooled = chosen = 0
    for index, (height, width, budget) in enumerate(cases):
        patch, max_size, factors = SETTINGS[index % len(SETTINGS)]
        plan = check_plan(height, width, budget, patch, max_size, factors)
        pooled += plan.pooled
        chosen += plan.shuffle_factor == min(factors)
    assert len(cases) > 4000 and pooled > 100 and chosen > 100  # both branches were exercised


@settings(max_examples=300, deadline=None)
@given(
    height=st.one_of(st.integers(1, 10000), st.sampled_from(PRIMES)),
    width=st.one_of(st.integers(1, 10000), st.sampled_from(PRIMES)),
    budget=st.one_of(st.integers(1, 4096), st.sampled_from(BUDGETS)),
    setting=st.sampled_from(SETTINGS),
)
def test_plan_properties_hypothesis(height, width, budget, setting):
    check_plan(height, width, budget, *setting)


@settings(max_examples=100, deadline=None)
@given(height=st.integers(1, 10000), width=st.integers(1, 10000), latents=st.integers(1, 64), extra=st.integers(0, 100))
def test_perceiver_plan_is_fixed_latents(height, width, latents, extra):
    plan = plan_image(height, width, max_image_tokens=latents + extra, connector="perceiver", perceiver_latents=latents)
    assert (plan.token_height, plan.token_width, plan.shuffle_factor) == (1, latents, 1)
    assert max(plan.resized_height, plan.resized_width) <= 2048
    assert plan.resized_height % 16 == 0 and plan.resized_width % 16 == 0


def test_processor_plan_matches_plan_image_and_is_deterministic():
    ip = NanoVLMImageProcessor(max_image_tokens=100, max_image_size=1000, shuffle_factors=[4, 1, 2])
    rng = random.Random(0)
    for _ in range(500):
        height, width = random_size(rng)
        plan = plan_image(height, width, max_image_tokens=100, max_image_size=1000, shuffle_factors=(1, 2, 4))
        assert ip.plan(height, width) == plan == ip.plan(height, width)
        assert ip.num_image_tokens(height, width) == plan.num_tokens
        small_budget = check_plan(height, width, 7, 16, 1000)
        assert ip.num_image_tokens(height, width, max_image_tokens=7) == small_budget.num_tokens


# --- the seed's examples -------------------------------------------------------------------------

# (height, width, budget) -> (resized H, W, grid Gh, Gw, s, token th, tw),
# defaults: patch 16, factors (1, 2, 4), max 2048
TABLE = {
    (768, 768, 1024): (768, 768, 48, 48, 2, 24, 24),  # s=1 would be 2304 tokens; s=2 gives 576
    (1024, 1024, 1024): (1024, 1024, 64, 64, 2, 32, 32),  # exactly the budget at s=2
    (2048, 2048, 1024): (2048, 2048, 128, 128, 4, 32, 32),  # s=2 gives 4096; s=4 gives 1024
    (768, 768, 256): (768, 768, 48, 48, 4, 12, 12),
    (1024, 1024, 256): (1024, 1024, 64, 64, 4, 16, 16),
    (2048, 2048, 256): (2048, 2048, 128, 128, 4, 16, 16),  # pooled 32x32 -> 16x16
    (768, 768, 64): (768, 768, 48, 48, 4, 8, 8),  # pooled 12x12 -> 8x8
    (1024, 1024, 64): (1024, 1024, 64, 64, 4, 8, 8),  # pooled 16x16 -> 8x8
    (2048, 2048, 64): (2048, 2048, 128, 128, 4, 8, 8),  # pooled 32x32 -> 8x8
    (2048, 2048, 16): (2048, 2048, 128, 128, 4, 4, 4),  # was 4x16 = 64 tokens > 16 before the fix
    (4096, 4096, 1024): (2048, 2048, 128, 128, 4, 32, 32),  # long side capped at max_image_size
    (480, 640, 1024): (480, 640, 30, 40, 2, 15, 20),
    (224, 224, 1024): (224, 224, 14, 14, 1, 14, 14),  # small images keep s=1 (most detail)
    (1, 1, 1024): (16, 16, 1, 1, 1, 1, 1),  # tiny images grow to one token
    (1, 10000, 1024): (16, 2048, 1, 128, 1, 1, 128),
    (1, 10000, 64): (32, 2048, 2, 128, 2, 1, 64),  # s=1 gives 1x128; s=2 gives exactly 1x64
    (10000, 1, 10): (2048, 64, 128, 4, 4, 10, 1),  # very tall, pooled to one column (was 0 tokens before the fix)
    (10000, 1000, 2): (2048, 192, 128, 12, 4, 2, 1),
}


@pytest.mark.parametrize("size_budget, expected", TABLE.items(), ids=[f"{h}x{w}@{b}" for h, w, b in TABLE])
def test_seed_examples(size_budget, expected):
    height, width, budget = size_budget
    plan = plan_image(height, width, max_image_tokens=budget)
    assert plan == ImagePlan(*expected)
    merged_cells = (plan.grid_height // plan.shuffle_factor) * (plan.grid_width // plan.shuffle_factor)
    assert plan.pooled == (plan.num_tokens < merged_cells)
    check_plan(height, width, budget)


def test_pooled_flag():
    assert not plan_image(1024, 1024, max_image_tokens=1024).pooled
    assert plan_image(1024, 1024, max_image_tokens=64).pooled


# --- bad settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -1, -1024])
def test_budget_below_one_is_an_error(budget, processor):
    with pytest.raises(ValueError, match="max_image_tokens must be >= 1"):
        plan_image(100, 100, max_image_tokens=budget)
    with pytest.raises(ValueError, match="max_image_tokens must be >= 1"):
        NanoVLMImageProcessor(max_image_tokens=budget)
    with pytest.raises(ValueError, match="max_image_tokens must be >= 1"):
        processor.num_image_tokens(100, 100, max_image_tokens=budget)
    with pytest.raises(ValueError, match="max_image_tokens must be >= 1"):
        processor(text="<image>", images=[np.zeros((32, 32, 3), np.uint8)], max_image_tokens=budget)


@pytest.mark.parametrize("height, width", [(0, 10), (10, 0), (-3, 5), (2.5, 10), (None, 10)])
def test_bad_sizes_are_errors(height, width):
    with pytest.raises(ImageInputError, match="positive integers"):
        plan_image(height, width)


def test_bad_plan_settings_are_errors():
    with pytest.raises(ValueError, match="connector"):
        plan_image(10, 10, connector="mlp")
    with pytest.raises(ValueError, match="shuffle_factors"):
        plan_image(10, 10, shuffle_factors=(0, 2))
    with pytest.raises(ValueError, match="shuffle_factors"):
        plan_image(10, 10, shuffle_factors=())
    with pytest.raises(ValueError, match="smaller than one token cell"):
        plan_image(10, 10, max_image_size=32, shuffle_factors=(1, 4))
    with pytest.raises(ValueError, match="Perceiver"):
        plan_image(10, 10, max_image_tokens=8, connector="perceiver", perceiver_latents=9)
    with pytest.raises(TypeError, match="unknown plan setting"):
        NanoVLMImageProcessor().plan(10, 10, max_tokens=5)


BAD_MODEL_SETTINGS = [
    {"connector": "mlp"},
    {"shuffle_factors": (0, 2)},
    {"shuffle_factors": ()},
    {"shuffle_factors": (2.5,)},
    {"shuffle_factors": (-1, 2)},
    {"connector": "perceiver", "shuffle_factors": ()},
]


@pytest.mark.parametrize("bad", BAD_MODEL_SETTINGS)
def test_model_config_and_image_processor_refuse_the_same_settings_alike(bad):
    """The model package cannot import processing (Hub export), so NanoVLMConfig checks connector and factors itself;
    it must give the image processor's answer, message included, and accept what it accepts."""
    from modeling_nanovlm import configuration_nanovlm, tiny_config
    from processing import image_processing_nanovlm

    assert configuration_nanovlm.CONNECTOR_MODES == image_processing_nanovlm.CONNECTOR_MODES
    with pytest.raises(ValueError) as processor_error:
        NanoVLMImageProcessor(**bad)
    with pytest.raises(ValueError) as config_error:
        tiny_config(**bad)
    assert str(config_error.value) == str(processor_error.value)
    for good in ({"shuffle_factors": (4, 2.0)}, {"connector": "perceiver"}):
        assert tiny_config(**good).shuffle_factors == NanoVLMImageProcessor(**good).shuffle_factors


def test_model_and_processor_packages_name_the_same_image_token():
    """Written in both packages (each loads alone as remote code): `from_backbones` adds it to the tokenizer, the
    processor expands it."""
    import modeling_nanovlm
    import processing

    assert modeling_nanovlm.IMAGE_TOKEN == processing.IMAGE_TOKEN == "<image>"


# --- the plan agrees with the processor's input_ids and the model's features ----------------------

image_sizes = st.tuples(st.integers(1, 900), st.integers(1, 900)) | st.sampled_from(
    [(1, 1), (1, 900), (900, 1), (3, 700), (509, 127), (17, 17)]
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(image_sizes, min_size=1, max_size=3),
    budget=st.integers(1, 120),
    max_size=st.sampled_from([256, 320]),
    seed=st.integers(0, 2**16),
)
def test_num_image_tokens_matches_input_ids_and_model_features(tokenizer, tiny_model, sizes, budget, max_size, seed):
    processor = NanoVLMProcessor(
        image_processor=NanoVLMImageProcessor(max_image_tokens=budget, max_image_size=max_size), tokenizer=tokenizer
    )
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    texts = [f"picture {i}: <image> what is it?" for i in range(len(images))]
    batch = processor(text=texts, images=images, return_tensors="pt")
    expected = [processor.num_image_tokens(h, w) for h, w in sizes]
    placed = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert placed == expected
    assert [int(h * w) for h, w in batch["image_token_hw"].tolist()] == expected
    with torch.no_grad():
        features = tiny_model.get_image_features(
            batch["pixel_values"], batch["image_grid_hw"], batch["image_token_hw"], batch["image_shuffle_factor"]
        )
        assert features.shape == (sum(expected), tiny_model.config.text_config.hidden_size)
        logits = tiny_model(**batch).logits
    assert torch.isfinite(logits).all()


def test_model_names_both_counts_on_mismatch(processor, tiny_model):
    image = np.zeros((256, 256, 3), np.uint8)
    big = processor(text="<image> hi", images=[image], max_image_tokens=64, return_tensors="pt")
    small = processor(text="<image> hi", images=[image], max_image_tokens=16, return_tensors="pt")
    assert processor.num_image_tokens(256, 256, max_image_tokens=64) == 64
    assert processor.num_image_tokens(256, 256, max_image_tokens=16) == 16
    mixed = {**big, "input_ids": small["input_ids"], "attention_mask": small["attention_mask"]}
    with torch.no_grad(), pytest.raises(ValueError, match=r"input_ids hold 16 image tokens but the images give 64"):
        tiny_model(**mixed)
    dropped = big["input_ids"].clone()
    dropped[0, (dropped[0] == processor.image_token_id).nonzero()[0]] = 0  # one image token overwritten
    with torch.no_grad(), pytest.raises(ValueError, match=r"input_ids hold 63 image tokens but the images give 64"):
        tiny_model(**{**big, "input_ids": dropped})
    no_pixels = {"input_ids": big["input_ids"], "attention_mask": big["attention_mask"]}
    with torch.no_grad(), pytest.raises(ValueError, match=r"64 image tokens but no pixel_values"):
        tiny_model(**no_pixels)


# --- the plan picture ----------------------------------------------------------------------------


def test_visualize_plan_writes_a_png(tmp_path):
    from PIL import Image

    spec = importlib.util.spec_from_file_location("visualize_plan", REPO / "examples" / "visualize_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "plan.png"
    plan = module.main([str(source), "--max_image_tokens", "4", "--out", str(out)])
    assert plan.pooled and plan.num_tokens <= 4  # 3x5 tokens at s=4, pooled
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 100
