"""Shared pieces of the benchmark scripts: the synthetic data mix, torch settings, tables, JSON output, charts.

Each script has the same three parts: `run(...)` measures and returns the figures (a dict), `report(figures)` turns
them into the printed tables, and `main(argv)` parses the options (`argument_parser`: `--quick`, `--json`, `--seed`),
prints the report and returns the figures (what `run_all.py` calls). Every figure a script prints is also written,
unchanged, to `--json PATH`. Timings on a shared machine are noisy, so scripts compare settings as ratios measured
in one run, in alternating short windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(REPO_ROOT), str(REPO_ROOT / "examples")):  # run as `python benchmarks/x.py` from anywhere
    if _path not in sys.path:  # the package, installed or not, and the examples' offline tokenizer
        sys.path.insert(0, _path)

DOCS = REPO_ROOT / "docs"

# --------------------------------------------------------------------------------------------------------------
# The synthetic training mix
# --------------------------------------------------------------------------------------------------------------
#
# Image sizes (height x width, before any resizing), by kind, with the share of samples of each kind. The shares
# and sizes follow what public instruction-tuning mixes (The Cauldron, LLaVA-OneVision, Cambrian) are made of:
#   photo       45 %  natural photos: COCO/VQAv2/GQA-style, long side 640 for 60 % (COCO), else 400-1280
#                     (web photos); aspect 4:3 (50 %), 3:2 (30 %), 16:9 (10 %), 1:1 (10 %); 25 % portrait
#   document    15 %  scanned pages (DocVQA/InfoVQA-style): width 1600-1800, height 1.27-1.42 x width (letter..A4)
#   screenshot  10 %  1920x1080 (60 %) or 1280x720 (40 %), landscape
#   chart       15 %  ChartQA/PlotQA-style: width 700-900, height 450-650
#   small       15 %  icons, crops, thumbnails, synthetic puzzles: height and width each 64-256
#
# Text lengths (tokens of a SmolLM2-like BPE, the chat template included): template overhead 10 tokens, a question
# (log-normal, median 15, 4..120) and an answer of one of three kinds:
#   short       45 %  VQA-style, 1-5 tokens
#   sentence    30 %  captions / one-sentence answers, log-normal median 25, 8..80
#   long        25 %  detailed descriptions, OCR transcriptions, reasoning: log-normal median 200, 80..1024

KINDS = ("photo", "document", "screenshot", "chart", "small")
KIND_SHARES = (0.45, 0.15, 0.10, 0.15, 0.15)
TEMPLATE_TOKENS = 10


def _photo(rng: np.random.Generator) -> tuple[int, int]:
    long_side = 640 if rng.random() < 0.6 else int(rng.integers(400, 1281))
    aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0], p=[0.5, 0.3, 0.1, 0.1])
    short_side = max(1, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.25 else (short_side, long_side)


def _document(rng: np.random.Generator) -> tuple[int, int]:
    width = int(rng.integers(1600, 1801))
    return round(width * rng.uniform(1.27, 1.42)), width


def _screenshot(rng: np.random.Generator) -> tuple[int, int]:
    return (1080, 1920) if rng.random() < 0.6 else (720, 1280)


def _chart(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(450, 651)), int(rng.integers(700, 901))


def _small(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(64, 257)), int(rng.integers(64, 257))


_MAKERS = {"photo": _photo, "document": _document, "screenshot": _screenshot, "chart": _chart, "small": _small}


def _lognormal_int(rng, median: float, low: int, high: int, sigma: float = 0.6) -> int:
    return int(np.clip(round(rng.lognormal(math.log(median), sigma)), low, high))


def answer_length(rng: np.random.Generator) -> int:
    """Tokens of one answer, drawn from the three kinds above."""
    kind = rng.choice(3, p=[0.45, 0.30, 0.25])
    if kind == 0:
        return int(rng.integers(1, 6))
    if kind == 1:
        return _lognormal_int(rng, 25, 8, 80)
    return _lognormal_int(rng, 200, 80, 1024, sigma=0.7)


def question_length(rng: np.random.Generator) -> int:
    """Tokens of one question (log-normal, median 15, 4..120)."""
    return _lognormal_int(rng, 15, 4, 120)


def training_mix(num_samples: int, seed: int = 0, image_scale: float = 1.0, text_scale: float = 1.0) -> dict:
    """`num_samples` synthetic samples of the mix above: kinds, image sizes (h, w) and text lengths.

    `image_scale` shrinks every image side (at least 16 px) and `text_scale` every question and answer (at least
    one token), for runs that must stay cheap on a CPU while keeping the same spread of sizes and lengths.
    """
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=num_samples, p=KIND_SHARES)
    sizes, questions, answers = [], [], []
    for kind in kinds:
        height, width = _MAKERS[KINDS[kind]](rng)
        sizes.append((max(16, round(height * image_scale)), max(16, round(width * image_scale))))
        questions.append(max(1, round(question_length(rng) * text_scale)))
        answers.append(max(1, round(answer_length(rng) * text_scale)))
    text = [TEMPLATE_TOKENS + q + a for q, a in zip(questions, answers)]
    return {
        "kinds": [KINDS[k] for k in kinds],
        "image_sizes": sizes,
        "question_lengths": questions,
        "answer_lengths": answers,
        "text_lengths": text,
    }


def mix_description() -> dict:
    """The mix above in words and shares, for the JSON figures."""
    return {
        "kinds": dict(zip(KINDS, KIND_SHARES)),
        "sizes": {
            "photo": "long side 640 (60%) or 400-1280; aspect 4:3/3:2/16:9/1:1; 25% portrait",
            "document": "width 1600-1800, height 1.27-1.42 x width",
            "screenshot": "1920x1080 (60%) or 1280x720",
            "chart": "width 700-900, height 450-650",
            "small": "height and width 64-256 each",
        },
        "text": "10 template tokens + question (log-normal median 15) + answer: 45% 1-5 tokens, "
        "30% log-normal median 25 (8-80), 25% log-normal median 200 (80-1024)",
    }


# --------------------------------------------------------------------------------------------------------------
# Upstream nanoVLM's image scheme, for token-count comparisons
# --------------------------------------------------------------------------------------------------------------


def upstream_nanovlm_tokens(height: int, width: int, max_side: int = 2048, tile: int = 512,
                            tokens_per_tile: int = 64, resize_to_max_side: bool = True) -> int:
    """Image tokens of huggingface/nanoVLM's scheme (data/custom_transforms.py: DynamicResize + GlobalAndSplitImages).

    The long side is resized to `max_side` (`resize_to_max_side_len=True`; with False, to the long side rounded up
    to a multiple of `tile`, at most `max_side`), the short side scaled alike and rounded *up* to a multiple of
    `tile`; the image is cut into `tile` x `tile` tiles, plus one global view (the whole image at `tile` x `tile`)
    when there is more than one tile. Each tile is 32 x 32 SigLIP patches, pixel-shuffled by 4: 64 tokens.
    """
    long_side, short_side = max(height, width), min(height, width)
    target_long = max_side if resize_to_max_side else min(max_side, math.ceil(long_side / tile) * tile)
    target_short = max(tile, math.ceil(short_side * target_long / long_side / tile) * tile)
    tiles = (target_long // tile) * (target_short // tile)
    return tokens_per_tile * (tiles + (1 if tiles > 1 else 0))


def log_midpoints(values: Sequence[float]) -> tuple[float, ...]:
    """Edges half-way, on a log scale, between neighbouring values: sampler buckets that give each snapping size or
    aspect ratio a bucket of its own."""
    return tuple(math.sqrt(a * b) for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------------------


def set_torch_threads(threads: int) -> None:
    """Run torch on `threads` CPU threads and flush denormals (random tiny weights make many, which are slow on CPU)."""
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: `--quick`, `--json PATH`, `--seed`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a small setting for smoke tests (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def environment() -> dict:
    """Python, machine, CPU count, and torch / transformers versions, threads and GPU when torch is installed."""
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads(), cuda=torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def write_json(path: str | None, figures: dict) -> None:
    """Write `figures` to `path` (numpy scalars and arrays as plain JSON); nothing when `path` is empty."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {path}")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    """A plain-text table (right-aligned numbers, left-aligned text)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title, ""] if title else []
    out += [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        if value != value:
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def pct(fraction: float | None) -> str:
    """A fraction as a percentage with one decimal, "n/a" for None."""
    return "n/a" if fraction is None else f"{100 * fraction:.1f} %"


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, **savefig_kwargs) -> None:
    """Lay a chart out, save it (dpi 110 unless given), close it and say where it went."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, **{"dpi": 110, **savefig_kwargs})
    plt.close(fig)
    print(f"wrote {path}")


def _send_measurement(measure, setting: dict, connection) -> None:
    try:
        connection.send(measure(setting))
    except BaseException as error:  # report, do not hang the parent
        connection.send({"error": f"{type(error).__name__}: {error}"})
    finally:
        connection.close()


def run_in_fresh_processes(measure, settings: list[dict], report=print) -> list[dict]:
    """`measure(setting) -> dict` for each setting in a fresh process forked from a server that has only imported
    the libraries, so no setting sees another's memory (and glibc hands large freed blocks back to the OS). A
    setting that fails or outlives `setting["timeout"]` seconds raises; `report(setting, result)` is called as each
    result arrives."""
    import multiprocessing

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by glibc when the server process starts
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["torch", "transformers", "modeling_nanovlm", "processing"])
    results = []
    for setting in settings:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_send_measurement, args=(measure, setting, send))
        process.start()
        send.close()
        result = receive.recv() if receive.poll(setting["timeout"]) else {"error": "timed out"}
        process.join(10)
        if process.is_alive():
            process.kill()
        if "error" in result:
            raise RuntimeError(f"setting {setting}: {result['error']}")
        report(setting, result)
        results.append(result)
    return results
