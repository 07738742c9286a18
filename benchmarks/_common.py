"""Shared pieces of the benchmark scripts: options, the synthetic data mix, models, timing helpers, tables, JSON.

Each script has `run(args)`, which measures and returns the figures (a dict), `report(figures)`, which turns them
into the printed tables, and `main(argv)` (what `run_all.py` calls): `parse_args`, `run`, then `finish`, which
prints the report and writes the same figures to `--json PATH`. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(REPO_ROOT), str(REPO_ROOT / "examples")):  # run as `python benchmarks/x.py` from anywhere
    if _path not in sys.path:  # the package, installed or not, and the examples' offline tokenizer
        sys.path.insert(0, _path)

DOCS = REPO_ROOT / "docs"

# The synthetic training mix (described in docs/performance.md#the-synthetic-training-mix)

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


def _answer_length(rng: np.random.Generator) -> int:
    kind = rng.choice(3, p=[0.45, 0.30, 0.25])
    if kind == 0:
        return int(rng.integers(1, 6))
    if kind == 1:
        return _lognormal_int(rng, 25, 8, 80)
    return _lognormal_int(rng, 200, 80, 1024, sigma=0.7)


def training_mix(num_samples: int, seed: int = 0, image_scale: float = 1.0, text_scale: float = 1.0) -> dict:
    """`num_samples` synthetic samples of the mix: kinds, image sizes (h, w) and text lengths. `image_scale` and
    `text_scale` shrink every image side (at least 16 px) and every question and answer (at least one token)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=num_samples, p=KIND_SHARES)
    sizes, questions, answers = [], [], []
    for kind in kinds:
        height, width = _MAKERS[KINDS[kind]](rng)
        sizes.append((max(16, round(height * image_scale)), max(16, round(width * image_scale))))
        questions.append(max(1, round(_lognormal_int(rng, 15, 4, 120) * text_scale)))
        answers.append(max(1, round(_answer_length(rng) * text_scale)))
    text = [TEMPLATE_TOKENS + q + a for q, a in zip(questions, answers)]
    return {
        "kinds": [KINDS[k] for k in kinds],
        "image_sizes": sizes,
        "question_lengths": questions,
        "answer_lengths": answers,
        "text_lengths": text,
    }


def mix_description() -> dict:
    """The mix in words and shares, for the JSON figures."""
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


# Offline photos


def source_photos() -> dict[str, np.ndarray]:
    """Eight offline photos: scikit-image's and scikit-learn's samples."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
    photos = {name: getattr(data, name)() for name in names}
    photos.update(zip(("china", "flower"), load_sample_images().images))
    return photos


def encoded_photos(num_sources: int | None, sizes, quality: int = 90) -> list[dict]:
    """The first `num_sources` source photos at every (width, height) of `sizes` as JPEG bytes; every other source
    portrait."""
    from PIL import Image

    out = []
    for index, (name, pixels) in enumerate(list(source_photos().items())[:num_sources]):
        for width, height in sizes:
            if index % 2:
                width, height = height, width
            buffer = io.BytesIO()
            Image.fromarray(pixels).convert("RGB").resize((width, height), Image.BICUBIC).save(
                buffer, format="JPEG", quality=quality
            )
            out.append({"name": f"{name}_{width}x{height}", "height": height, "width": width,
                        "bytes": buffer.getvalue()})
    return out


# Image plans

SNAP_ASPECT_RATIOS = (1 / 3, 9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9, 3.0)


def upstream_nanovlm_tokens(height: int, width: int, max_side: int = 2048, tile: int = 512,
                            tokens_per_tile: int = 64, resize_to_max_side: bool = True) -> int:
    """Image tokens of huggingface/nanoVLM's scheme (DynamicResize + GlobalAndSplitImages): the long side resized
    to `max_side` (or, without `resize_to_max_side`, rounded up to whole tiles), the short side rounded up to whole
    tiles, plus a global view when there is more than one tile; 64 tokens a tile."""
    long_side, short_side = max(height, width), min(height, width)
    target_long = max_side if resize_to_max_side else min(max_side, math.ceil(long_side / tile) * tile)
    target_short = max(tile, math.ceil(short_side * target_long / long_side / tile) * tile)
    tiles = (target_long // tile) * (target_short // tile)
    return tokens_per_tile * (tiles + (1 if tiles > 1 else 0))


def log_midpoints(values: Sequence[float]) -> tuple[float, ...]:
    """Edges half-way, on a log scale, between neighbouring values: sampler buckets that give each snapping size or
    aspect ratio a bucket of its own."""
    return tuple(math.sqrt(a * b) for a, b in zip(values, values[1:]))


# torch, models and training steps


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


def tiny_model(tokenizer, image_token_id: int, seed: int):
    """The tiny preset (random weights from `seed`) sized to `tokenizer`."""
    import torch

    from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config

    torch.manual_seed(seed)
    return NanoVLMForConditionalGeneration(tiny_config(vocab_size=len(tokenizer), image_token_id=image_token_id))


def image_batch(processor, height: int, width: int, image_token: int, device, text_tokens: int = 64, rows: int = 1):
    """A training batch of `rows` rows, each a `height` x `width` image's tokens (random pixels) and `text_tokens`
    text tokens, and the image's plan."""
    import torch

    plan = processor.plan(height, width)
    ids = torch.full((rows, plan.num_tokens + text_tokens), 7)
    ids[:, 4 : 4 + plan.num_tokens] = image_token
    labels = ids.clone()
    labels[ids == image_token] = -100
    inputs = dict(
        input_ids=ids, labels=labels,
        pixel_values=torch.randn(rows * plan.num_patches, 3 * processor.patch_size**2),
        image_grid_hw=torch.tensor([[plan.grid_height, plan.grid_width]] * rows),
        image_token_hw=torch.tensor([[plan.token_height, plan.token_width]] * rows),
        image_shuffle_factor=torch.tensor([plan.shuffle_factor] * rows),
    )
    return {k: v.to(device) for k, v in inputs.items()}, plan


def train_step(model, optimizer, inputs: dict, autocast=None) -> float:
    """Forward (under `autocast` if given), backward and an optimizer step: the loss."""
    with autocast or contextlib.nullcontext():
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def rss_mb() -> float:
    """This process' resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    """This process' peak resident memory so far."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def timed(function, *args, **kwargs):
    """`function(*args, **kwargs)` and the seconds it took."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def rotated(names: list, turn: int) -> list:
    """`names` starting at `turn` (modulo their number): who goes first changes every turn."""
    start = turn % len(names)
    return names[start:] + names[:start]


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


# Options and output


def parse_args(doc: str, argv, options: dict, quick: dict | None = None) -> argparse.Namespace:
    """`--quick`, `--json PATH`, `--seed` and the script's `options` ({name: default}, each `--name-with-dashes` of
    the default's type; False makes a flag). With `--quick`, the `quick` values replace the options left at their
    default."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small setting for smoke tests (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    for name, default in options.items():
        flag = "--" + name.replace("_", "-")
        if default is False:
            parser.add_argument(flag, action="store_true", help="off by default")
        else:
            parser.add_argument(flag, type=type(default), default=default, help="default: %(default)r")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in (quick or {}).items():
            if getattr(args, name) == options[name]:
                setattr(args, name, value)
    return args


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


def finish(args, figures: dict, printed: str) -> dict:
    """Print the report, add the environment to the figures and write them to `--json PATH`; the figures."""
    print(printed)
    figures.setdefault("environment", environment())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2, default=_json_default) + "\n")
        print(f"\nwrote {path}")
    return figures


def benchmark_main(argv, doc: str, options: dict, quick: dict | None, run, report, plot=None) -> dict:
    """A script's `main`: parse the options, `run(args)`, print `report(figures)`, write the JSON and, with `--plot
    PATH`, draw `plot(figures, PATH)`; the figures."""
    args = parse_args(doc, argv, options, quick)
    figures = run(args)
    finish(args, figures, report(figures))
    if plot is not None and args.plot:
        plot(figures, args.plot)
    return figures


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
