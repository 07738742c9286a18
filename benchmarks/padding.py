"""Padding and tower calls per batch for one epoch of a realistic image/text mix: pure arithmetic from the plan.

    python benchmarks/padding.py [--samples 20000] [--batch-size 16] [--json PATH] [--plot docs/padding.png]

See docs/performance.md#padding.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from _common import (
    SNAP_ASPECT_RATIOS,
    benchmark_main,
    log_midpoints,
    mix_description,
    pct,
    pyplot,
    save_figure,
    table,
    training_mix,
)

GOALS = {"image_padding": 0.0, "lm_padding_max": 0.05, "tower_calls_per_batch_max": 1.2}
OPTIONS = dict(samples=20000, batch_size=16, max_image_tokens=1024, max_image_size=2048, plot="")
QUICK = dict(samples=1000)

# Snapping grid for (d), and sampler buckets that give each snapped shape a bucket of its own
SNAP_SIZES = (128, 256, 512, 768, 1024, 1536, 2048)
SNAP_BUCKETS = dict(size_buckets=log_midpoints(SNAP_SIZES), aspect_ratio_edges=log_midpoints(SNAP_ASPECT_RATIOS))


def sample_plans(image_processor, image_sizes):
    """Per sample: (resized h, w), patch grid, image tokens."""
    plans = [image_processor.plan(h, w) for h, w in image_sizes]
    return {
        "resized": np.array([(p.resized_height, p.resized_width) for p in plans]),
        "grid": np.array([(p.grid_height, p.grid_width) for p in plans]),
        "tokens": np.array([p.num_tokens for p in plans]),
    }


def batch_figures(batches, plans, text_lengths, patch_size) -> dict:
    """Padding and tower-call figures for a list of batches (lists of sample indices)."""
    lengths = np.asarray(text_lengths) + plans["tokens"]
    real_patches = padded_patches = real_lm = padded_lm = 0
    calls = []
    for batch in batches:
        batch = np.asarray(batch)
        grids = plans["grid"][batch]
        resized = plans["resized"][batch]
        real_patches += int((grids[:, 0] * grids[:, 1]).sum())
        max_h, max_w = resized[:, 0].max(), resized[:, 1].max()
        padded_patches += len(batch) * int(max_h // patch_size) * int(max_w // patch_size)
        rows = lengths[batch]
        real_lm += int(rows.sum())
        padded_lm += len(batch) * int(rows.max())
        calls.append(len({tuple(g) for g in grids.tolist()}))
    sizes = [len(b) for b in batches]
    return {
        "batches": len(batches),
        "samples": int(sum(sizes)),
        "mean_rows_per_batch": float(np.mean(sizes)),
        "image_padding_pad_to_max": 1 - real_patches / padded_patches,
        "tower_calls_per_batch": float(np.mean(calls)),
        "tower_calls_per_batch_max": int(max(calls)),
        "lm_padding": 1 - real_lm / padded_lm,
        "real_lm_tokens": real_lm,
        "padded_lm_tokens": padded_lm,
        "real_tower_patches": real_patches,
        "padded_tower_patches_pad_to_max": padded_patches,
    }


def chunks(indices, size) -> list[list]:
    """Consecutive batches of `size` indices (the last may be shorter)."""
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def run(args) -> dict:
    """Padding and tower-call figures of every strategy, whole-epoch and streamed, over one epoch of the mix."""
    from processing import NanoVLMImageProcessor

    batch_size, seed = args.batch_size, args.seed
    mix = training_mix(args.samples, seed=seed)
    sizes, text = mix["image_sizes"], mix["text_lengths"]
    budget_settings = {"max_image_tokens": args.max_image_tokens, "max_image_size": args.max_image_size}
    ip = NanoVLMImageProcessor(**budget_settings)
    patch = ip.patch_size
    plans = sample_plans(ip, sizes)
    total = np.asarray(text) + plans["tokens"]
    # Token budget: on average as many real tokens per batch as `batch_size` rows, and room for the longest sample.
    budget = max(int(total.max()), math.ceil(batch_size * total.mean() / 1024) * 1024)

    results = baseline_figures(plans, text, total, patch, batch_size, seed)
    results.update(bucket_figures(ip, sizes, plans, text, patch, batch_size, budget, seed))
    snap_ip = NanoVLMImageProcessor(**budget_settings, snap_sizes=list(SNAP_SIZES),
                                    snap_aspect_ratios=list(SNAP_ASPECT_RATIOS))
    snap_plans = sample_plans(snap_ip, sizes)
    results.update(bucket_figures(snap_ip, sizes, snap_plans, text, patch, batch_size, budget, seed, **SNAP_BUCKETS))
    for key, figures in results.items():
        per_shape = key.startswith(("c_", "d_"))  # nanoVLM's own batching: one tower call per shape, no padding
        figures["image_padding_as_run"] = 0.0 if per_shape else figures["image_padding_pad_to_max"]
        figures["meets_goals"] = bool(
            per_shape
            and figures["lm_padding"] <= GOALS["lm_padding_max"]
            and figures["tower_calls_per_batch"] <= GOALS["tower_calls_per_batch_max"]
        )

    streaming = streaming_figures(ip, sizes, text, plans, patch, batch_size, budget, seed)
    # snapping inside the buffer too: one shape per bucket
    streaming.update(streaming_figures(snap_ip, sizes, text, snap_plans, patch, batch_size, None, seed,
                                       suffix="_snap", **SNAP_BUCKETS))
    return {
        "benchmark": "padding",
        "settings": {
            "samples": args.samples, "batch_size": batch_size, "max_tokens_per_batch": budget, "seed": seed,
            **budget_settings, "patch_size": patch,
            "snap_sizes": list(SNAP_SIZES), "snap_aspect_ratios": [round(r, 4) for r in SNAP_ASPECT_RATIOS],
        },
        "mix": {**mix_description(), "counts": dict(Counter(mix["kinds"])),
                "mean_text_tokens": float(np.mean(text)), "mean_image_tokens": float(plans["tokens"].mean()),
                "distinct_image_shapes": len({tuple(r) for r in plans["resized"].tolist()})},
        "goals": GOALS,
        "strategies": results,
        "streaming": streaming,
        "notes": {"snapping_cost": snapping_cost(sizes, plans, snap_plans)},
    }


def baseline_figures(plans, text, total, patch, batch_size, seed) -> dict:
    """(a) random batches and (b) transformers' LengthGroupedSampler on text and on text + image lengths."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    random_batches = chunks(torch.randperm(len(text), generator=generator).tolist(), batch_size)
    results = {"a_random": batch_figures(random_batches, plans, text, patch)}
    for key, lengths in (("b_length_grouped_text", list(text)), ("b_length_grouped_total", total.tolist())):
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
        results[key] = batch_figures(chunks(list(iter(sampler)), batch_size), plans, text, patch)
    return results


def bucket_figures(ip, sizes, plans, text, patch, batch_size, budget, seed, **bucket_edges) -> dict:
    """BucketBatchSampler by batch size and by token budget: (c), or (d) when `ip` snaps (edges given)."""
    from processing import BucketBatchSampler

    key = "d_bucket_snap" if bucket_edges else "c_bucket"
    by_size = BucketBatchSampler(sizes, text, ip, batch_size=batch_size, seed=seed, **bucket_edges)
    by_budget = BucketBatchSampler(sizes, text, ip, max_tokens_per_batch=budget, seed=seed, **bucket_edges)
    return {key: batch_figures(by_size.batches(0), plans, text, patch),
            f"{key}_max_tokens": batch_figures(by_budget.batches(0), plans, text, patch)}


def snapping_cost(sizes, plans, snap_plans) -> dict:
    """How far snapping moves images (scale, aspect) and what it does to tokens, patches and distinct shapes."""
    scale = np.log(snap_plans["resized"].max(1) / plans["resized"].max(1))
    aspect = np.log((snap_plans["resized"][:, 1] / snap_plans["resized"][:, 0])
                    / (np.asarray(sizes)[:, 1] / np.asarray(sizes)[:, 0]))
    return {
        "mean_abs_scale_change": float(np.expm1(np.abs(scale)).mean()),
        "mean_abs_aspect_change": float(np.expm1(np.abs(aspect)).mean()),
        "max_abs_aspect_change": float(np.expm1(np.abs(aspect)).max()),
        "image_tokens_per_image_unsnapped": float(plans["tokens"].mean()),
        "image_tokens_per_image_snapped": float(snap_plans["tokens"].mean()),
        "tower_patches_per_image_unsnapped": float((plans["grid"][:, 0] * plans["grid"][:, 1]).mean()),
        "tower_patches_per_image_snapped": float((snap_plans["grid"][:, 0] * snap_plans["grid"][:, 1]).mean()),
        "distinct_shapes_unsnapped": len({tuple(r) for r in plans["resized"].tolist()}),
        "distinct_shapes_snapped": len({tuple(r) for r in snap_plans["resized"].tolist()}),
    }


STREAM_BUFFERS = (256, 1024, 8192)


def streaming_figures(ip, sizes, text, plans, patch, batch_size, budget, seed, suffix="", **bucket_edges) -> dict:
    """One epoch of StreamingBucketBatches per buffer size (fixed batch size, and the token budget if given)."""
    import datasets

    from processing import StreamingBucketBatches

    rows = datasets.Dataset.from_dict({
        "id": list(range(len(text))),
        "image": [f"image-{index}.jpg" for index in range(len(text))],  # never opened: sizes come from the columns
        "height": [int(h) for h, _ in sizes], "width": [int(w) for _, w in sizes],
        "text_tokens": [int(t) for t in text],
    }).to_iterable_dataset(num_shards=8)
    figures = {}
    for buffer_size in STREAM_BUFFERS:
        modes = [("", dict(batch_size=batch_size))] + ([("_max_tokens", dict(max_tokens_per_batch=budget))]
                                                        if budget else [])
        for name, batching in modes:
            stream = StreamingBucketBatches(rows, ip, text_length="text_tokens", buffer_size=buffer_size, seed=seed,
                                            **batching, **bucket_edges)
            batches = [[row["id"] for row in batch] for batch in stream]
            figures[f"buffer_{buffer_size}{name}{suffix}"] = batch_figures(batches, plans, text, patch)
    return figures


LABELS = {
    "a_random": "(a) random, pad to max",
    "b_length_grouped_text": "(b) LengthGrouped (text len)",
    "b_length_grouped_total": "(b') LengthGrouped (text+img len)",
    "c_bucket": "(c) ours",
    "c_bucket_max_tokens": "(c) ours, max_tokens",
    "d_bucket_snap": "(d) ours + snap",
    "d_bucket_snap_max_tokens": "(d) ours + snap, max_tokens",
}


def report(figures: dict) -> str:
    s = figures["settings"]
    rows = []
    for key, label in LABELS.items():
        f = figures["strategies"][key]
        rows.append([label, f["batches"], round(f["mean_rows_per_batch"], 1), pct(f["image_padding_pad_to_max"]),
                     pct(f["image_padding_as_run"]), round(f["tower_calls_per_batch"], 2), pct(f["lm_padding"])])
    headers = ["strategy", "batches", "rows/batch", "img pad if padded", "img pad as run", "tower calls/batch",
               "LM pad"]
    out = [table(headers, rows, title=(
        f"Padding over one epoch of {s['samples']} samples, batch {s['batch_size']} "
        f"(max_tokens rows: max_tokens_per_batch={s['max_tokens_per_batch']}); "
        f"max_image_tokens={s['max_image_tokens']}, max_image_size={s['max_image_size']}"))]
    mix = figures["mix"]
    out.append(f"\nmix: {mix['counts']}; mean text tokens {mix['mean_text_tokens']:.0f}, mean image tokens "
               f"{mix['mean_image_tokens']:.0f}, {mix['distinct_image_shapes']} distinct planned image shapes")
    out.append("img pad if padded: tower patches that are padding when each batch is padded to its largest image;"
               "\nas run: (a)/(b) pad (a fixed-shape tower), (c)/(d) run the tower once per shape and never pad.")
    g = figures["goals"]
    out.append(f"goals: image padding 0, LM padding <= {pct(g['lm_padding_max'])}, tower calls/batch <= "
               f"{g['tower_calls_per_batch_max']}")
    for key in ("c_bucket", "c_bucket_max_tokens", "d_bucket_snap", "d_bucket_snap_max_tokens"):
        verdict = "meets the goals" if figures["strategies"][key]["meets_goals"] else "misses a goal"
        out.append(f"  {LABELS[key]}: {verdict}")
    out.append("")
    out.append(streaming_report(figures))
    c = figures["notes"]["snapping_cost"]
    out.append(f"snapping cost: long side moved {pct(c['mean_abs_scale_change'])} on average, aspect ratio "
               f"{pct(c['mean_abs_aspect_change'])} on average (max {pct(c['max_abs_aspect_change'])}); image "
               f"tokens/image {c['image_tokens_per_image_unsnapped']:.0f} -> "
               f"{c['image_tokens_per_image_snapped']:.0f}, tower patches/image "
               f"{c['tower_patches_per_image_unsnapped']:.0f} -> {c['tower_patches_per_image_snapped']:.0f}; "
               f"distinct shapes {c['distinct_shapes_unsnapped']} -> {c['distinct_shapes_snapped']}")
    return "\n".join(out)


def streaming_report(figures: dict) -> str:
    s, strategies, streaming = figures["settings"], figures["strategies"], figures["streaming"]
    rows = []
    for mode, suffix in (("batch", ""), ("max_tokens", "_max_tokens")):
        reference = [("(a) random, whole epoch", strategies["a_random"])] if not suffix else []
        reference.append(("(c) BucketBatchSampler, whole epoch", strategies[f"c_bucket{suffix}"]))
        streamed = [(f"streaming, buffer {size:,}", streaming[f"buffer_{size}{suffix}"]) for size in STREAM_BUFFERS]
        if not suffix:
            streamed += [("(d) BucketBatchSampler + snap, whole epoch", strategies["d_bucket_snap"])]
            streamed += [(f"streaming + snap, buffer {size:,}", streaming[f"buffer_{size}_snap"])
                         for size in STREAM_BUFFERS]
        for label, f in reference + streamed:
            rows.append([mode, label, f["batches"], round(f["mean_rows_per_batch"], 1),
                         round(f["tower_calls_per_batch"], 2), pct(f["lm_padding"])])
    return table(["batching", "strategy", "batches", "rows/batch", "tower calls/batch", "LM pad"], rows, title=(
        f"Streaming (StreamingBucketBatches on a datasets.IterableDataset, 8 shards) vs whole-epoch bucketing, "
        f"same {s['samples']} samples, batch {s['batch_size']} / max_tokens_per_batch={s['max_tokens_per_batch']}"))


def plot(figures: dict, path: str) -> None:
    """Three bar panels per strategy: image padding if padded, LM padding, tower calls per batch."""
    plt = pyplot()
    keys = list(LABELS)
    labels = [LABELS[k] for k in keys]
    f = [figures["strategies"][k] for k in keys]
    colors = ["#b0b0b0" if k.startswith(("a_", "b_")) else "#2f7ed8" for k in keys]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    y = np.arange(len(keys))
    panels = [
        ([100 * x["image_padding_pad_to_max"] for x in f],
         "tower patches that are padding, %\n(batch padded to its largest image)", None),
        ([100 * x["lm_padding"] for x in f], "LM tokens that are padding, %", 100 * GOALS["lm_padding_max"]),
        ([x["tower_calls_per_batch"] for x in f],
         "distinct image shapes per batch\n(= nanoVLM tower calls)", GOALS["tower_calls_per_batch_max"]),
    ]
    for ax, (values, title, goal) in zip(axes, panels):
        ax.barh(y, values, color=colors)
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.1f}" if v < 100 else f" {v:.0f}", va="center", fontsize=8)
        if goal is not None:
            ax.axvline(goal, color="#d9534f", linestyle="--", linewidth=1)
            ax.text(goal, len(keys) - 0.4, " goal", color="#d9534f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max(values) * 1.25 if max(values) > 0 else 1)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    s = figures["settings"]
    fig.suptitle(f"One epoch of {s['samples']} samples of a mixed-size VLM training set, batch {s['batch_size']} "
                 f"(grey: baselines; blue: nanoVLM, which runs the tower per shape and never pads images)", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, OPTIONS, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
