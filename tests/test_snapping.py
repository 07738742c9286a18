"""Snapping images to bucket resolutions: one exact shape per bucket, still within the budget."""

import random

import pytest

from processing import NanoVLMImageProcessor

SIZES = [256, 512, 768, 1024]
ASPECTS = [0.5, 0.75, 1.0, 4 / 3, 2.0]


def test_snapping_gives_one_shape_per_bucket_and_keeps_the_budget():
    processor = NanoVLMImageProcessor(max_image_tokens=256, snap_sizes=SIZES, snap_aspect_ratios=ASPECTS)
    rng = random.Random(0)
    shapes = set()
    for _ in range(2000):
        height, width = rng.randint(1, 4000), rng.randint(1, 4000)
        plan = processor.plan(height, width)
        assert plan.num_tokens <= 256
        shapes.add((plan.resized_height, plan.resized_width))
    assert len(shapes) <= len(SIZES) * len(ASPECTS)


def test_similar_images_share_a_shape_and_unsnapped_ones_do_not():
    snapped = NanoVLMImageProcessor(snap_sizes=SIZES, snap_aspect_ratios=ASPECTS)
    plain = NanoVLMImageProcessor()
    sizes = [(480, 640), (500, 650), (600, 800)]
    assert len({(snapped.plan(*hw).resized_height, snapped.plan(*hw).resized_width) for hw in sizes}) == 1
    assert len({(plain.plan(*hw).resized_height, plain.plan(*hw).resized_width) for hw in sizes}) == 3


def test_snapping_is_off_by_default_and_overridable_per_call():
    processor = NanoVLMImageProcessor()
    assert processor.snap_sizes is None
    plan = processor.plan(480, 640, snap_sizes=[1024], snap_aspect_ratios=[1.0])
    assert (plan.resized_height, plan.resized_width) == (1024, 1024)


def test_snap_settings_survive_save_and_load(tmp_path):
    processor = NanoVLMImageProcessor(snap_sizes=SIZES, snap_aspect_ratios=ASPECTS)
    processor.save_pretrained(tmp_path)
    loaded = NanoVLMImageProcessor.from_pretrained(tmp_path)
    assert loaded.snap_sizes == SIZES and loaded.snap_aspect_ratios == pytest.approx(ASPECTS)
    assert loaded.plan(333, 777) == processor.plan(333, 777)
