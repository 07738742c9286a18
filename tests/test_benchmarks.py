"""Smoke test of the benchmark scripts: each runs with `--quick --json PATH` and writes the figures it prints.

All scripts run once, in one fresh process (`benchmarks/run_all.py --quick`, which calls each script's `main` with
`--quick --json <results>/<name>.json`), so the libraries are imported once and no benchmark setting (threads,
denormals) leaks into this test process. The whole file takes well under a minute.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

EXPECTED = {
    "padding": {
        "top": {"settings", "mix", "goals", "strategies", "streaming", "notes", "environment"},
        "strategies": ["a_random", "b_length_grouped_text", "b_length_grouped_total", "c_bucket",
                       "c_bucket_max_tokens", "d_bucket_snap", "d_bucket_snap_max_tokens"],
        "per_strategy": {"batches", "samples", "image_padding_pad_to_max", "image_padding_as_run",
                         "tower_calls_per_batch", "lm_padding", "meets_goals"},
    },
    "throughput": {
        "top": {"settings", "goal", "strategies", "ratios", "image_tokens_vs_upstream", "pipeline", "breakdown",
                "environment"},
        "strategies": ["ours", "random", "pad-to-max"],
        "per_strategy": {"batches", "samples", "samples_per_second", "useful_tokens_per_second", "lm_padding",
                         "tower_calls_per_batch", "tower_patches_per_sample"},
    },
    "preprocess": {"top": {"settings", "goal", "budgets", "fast_variants", "environment"}},
    "memory": {"top": {"settings", "goal", "by_long_side", "growth_first_to_last", "measurements", "environment"}},
    "generate": {"top": {"settings", "goal", "cache", "no_cache", "speedup", "same_tokens", "environment"}},
    "gpu_check": {"top": {"settings", "step_seconds", "samples_per_second", "lm_tokens_per_second",
                          "peak_memory_gib", "model_flops_per_step", "achieved_tflops", "mfu", "environment"}},
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--results", str(results)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    return results, completed


def load(results: Path, name: str, completed) -> dict:
    path = results / f"{name}.json"
    log = (results / f"{name}.txt").read_text() if (results / f"{name}.txt").exists() else completed.stdout
    assert path.exists(), f"{name} wrote no JSON:\n{log[-4000:]}\n{completed.stderr[-4000:]}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_run_writes_the_expected_figures(quick_results, name):
    results, completed = quick_results
    figures = load(results, name, completed)
    expected = EXPECTED[name]
    assert figures["benchmark"] == name
    assert expected["top"] <= set(figures), sorted(expected["top"] - set(figures))
    for strategy in expected.get("strategies", []):
        assert expected["per_strategy"] <= set(figures["strategies"][strategy]), strategy
    printed = (results / f"{name}.txt").read_text()
    assert printed.strip(), "the script printed no table"


def test_all_benchmarks_succeed(quick_results):
    results, completed = quick_results
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    assert {name: s["status"] for name, s in summary["benchmarks"].items()} == {name: "ok" for name in EXPECTED}


def test_figures_are_consistent(quick_results):
    results, completed = quick_results
    padding = load(results, "padding", completed)
    samples = padding["settings"]["samples"]
    for key, strategy in padding["strategies"].items():
        assert strategy["samples"] == samples, key  # one epoch: every sample once
        assert 0 <= strategy["lm_padding"] < 1 and 0 <= strategy["image_padding_pad_to_max"] < 1
    assert padding["strategies"]["c_bucket"]["image_padding_as_run"] == 0.0  # nanoVLM never pads images
    assert set(padding["streaming"]) == {f"buffer_{size}{mode}" for size in (256, 1024, 8192)
                                         for mode in ("", "_max_tokens", "_snap")}
    for key, streamed in padding["streaming"].items():
        assert streamed["samples"] == samples, key  # buffered bucketing: every sample once per epoch too
        assert 0 <= streamed["lm_padding"] < 1 and streamed["tower_calls_per_batch"] >= 1

    throughput = load(results, "throughput", completed)
    assert throughput["strategies"]["ours"]["samples"] == throughput["strategies"]["random"]["samples"]
    assert throughput["ratios"]["ours_vs_random"]["samples_per_second"] > 0

    pipeline = throughput["pipeline"]["configs"]
    assert set(pipeline) == {"0 workers, float32", "0 workers, uint8", "2 workers, float32", "2 workers, uint8"}
    for config in pipeline.values():
        assert config["samples"] > 0 and config["samples_per_second"] > 0
    # uint8 transport moves a quarter of the bytes of float32
    float_mb = pipeline["0 workers, float32"]["pixel_mb_per_batch"]
    uint8_mb = pipeline["0 workers, uint8"]["pixel_mb_per_batch"]
    assert abs(uint8_mb * 4 - float_mb) < 1e-6 * float_mb
    for figures in throughput["breakdown"]["by_pixel_dtype"].values():
        assert set(figures["ms_per_sample"]) >= {"decode", "resize + patchify + normalise", "optimizer"}
        assert abs(sum(figures["share"].values()) - 1) < 1e-9 and min(figures["ms_per_sample"].values()) >= 0

    preprocess = load(results, "preprocess", completed)
    for budget in preprocess["budgets"].values():
        methods = budget["methods"]
        expected = {"floor (decode + resize)", "ours float32", "ours uint8", "qwen2-vl (PIL)", "idefics3 (PIL)"}
        assert expected <= set(methods)
        # ours and the floor see the same plans, so the same image tokens
        assert methods["ours float32"]["tokens_per_image"] == methods["floor (decode + resize)"]["tokens_per_image"]
        uint8_mb, float_mb = methods["ours uint8"]["pixel_mb_per_image"], methods["ours float32"]["pixel_mb_per_image"]
        assert uint8_mb * 4 == pytest.approx(float_mb)
        assert budget["ratio_to_floor"]["floor (decode + resize)"] == 1.0

    memory = load(results, "memory", completed)
    for side in memory["by_long_side"].values():
        assert side["peak_growth_mb_off"] > 0 and side["peak_growth_mb_on"] > 0

    generate = load(results, "generate", completed)
    assert generate["same_tokens"] is True  # greedy decoding gives the same tokens with or without the cache
    assert generate["cache"]["new_tokens"] == generate["settings"]["new_tokens"]

    gpu = load(results, "gpu_check", completed)
    assert gpu["model_flops_per_step"]["total"] > 0 and gpu["step_seconds"] > 0


def test_upstream_token_count_matches_its_tiling_rule():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _common import upstream_nanovlm_tokens
    finally:
        sys.path.remove(str(BENCHMARKS))
    # 480x640 -> 1536x2048 -> 3x4 tiles + a global view, 64 tokens each
    assert upstream_nanovlm_tokens(480, 640) == 13 * 64
    # a single tile gets no global view; without resizing to 2048, a 512x512 image is one tile
    assert upstream_nanovlm_tokens(512, 512, resize_to_max_side=False) == 64
    assert upstream_nanovlm_tokens(512, 512) == 17 * 64


def test_gpu_check_shell_script_parses():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=True)
