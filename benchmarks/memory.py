"""Peak memory and step time of one training step vs the image's long side, gradient checkpointing off and on.

One image per step, 4:3 landscape (long side L, short side 3L/4: 2048 -> 2048x1536, 12288 patches), a fixed
image-token budget (`max_image_tokens`, 256 by default: the LM sees the same number of tokens at every L while the
tower sees (L/16)^2 * 3/4 patches), 64 text tokens. The model is `tiny_config` with a wider, deeper tower (hidden
192, 4 layers, 3 heads) so that the tower's activations dominate, random weights, fp32, SDPA attention. A step is
forward + backward + AdamW step, after one warm-up step on a small image.

Each setting runs in a fresh process (forked from a server that has only imported the libraries, so no setting
sees another's memory). Memory is the growth of the process' peak resident set during the step
(`resource.getrusage` max RSS minus the RSS just before it); on CUDA it is `torch.cuda.max_memory_allocated` minus
the memory allocated before the step. glibc's malloc is told to hand every block over 64 KiB straight back to the
OS (`MALLOC_MMAP_THRESHOLD_=65536`): with its default dynamic threshold it keeps freed activations in its heap and
RSS then shows the allocator's high-water mark instead of the tensors the step holds.

    python benchmarks/memory.py [--long-sides 512,1024,1536,2048] [--json PATH] [--plot docs/memory.png]
"""

from __future__ import annotations

import os
import sys

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import (
    REPO_ROOT,
    argument_parser,
    cuda_available,
    environment,
    pyplot,
    run_in_fresh_processes,
    save_figure,
    set_torch_threads,
    table,
    write_json,
)

GOAL_RATIO = 0.4
TEXT_TOKENS = 64
TOWER = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3)
QUICK_TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure(setting: dict) -> dict:
    """One training step at `setting` in this (fresh) process: peak memory growth and seconds."""
    import gc
    import time

    import torch

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config
    from processing import NanoVLMImageProcessor

    set_torch_threads(setting["threads"])
    torch.manual_seed(0)
    device = torch.device(setting["device"])
    model = NanoVLMForConditionalGeneration(tiny_config(vision=dict(setting["tower"]))).to(device)
    if setting["checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.text_config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    processor = NanoVLMImageProcessor(max_image_tokens=setting["max_image_tokens"], max_image_size=2048)

    def batch(height, width):
        return _one_image_batch(processor, height, width, model.config.image_token_id, device)

    _train_step(model, optimizer, batch(64, 64)[0])  # warm-up: lazy initialisation, optimizer state
    long_side = setting["long_side"]
    inputs, plan = batch(long_side * 3 // 4, long_side)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mb()
    start = time.perf_counter()
    loss = _train_step(model, optimizer, inputs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _max_rss_mb()
    return {
        **{k: setting[k] for k in ("long_side", "checkpointing")},
        "image_hw": [long_side * 3 // 4, long_side],
        "tower_patches": plan.num_patches,
        "image_tokens": plan.num_tokens,
        "peak_growth_mb": peak - before,
        "baseline_mb": before,
        "step_seconds": seconds,
        "loss": loss,
        "memory_measure": "cuda max_memory_allocated" if cuda else "max RSS (getrusage) growth",
    }


def _one_image_batch(processor, height: int, width: int, image_token: int, device) -> tuple[dict, object]:
    """A training batch of one row: a `height` x `width` image's tokens (random pixels) and TEXT_TOKENS text tokens."""
    import torch

    plan = processor.plan(height, width)
    ids = torch.full((1, plan.num_tokens + TEXT_TOKENS), 7)
    ids[0, 4 : 4 + plan.num_tokens] = image_token
    labels = ids.clone()
    labels[ids == image_token] = -100
    inputs = dict(
        input_ids=ids, labels=labels,
        pixel_values=torch.randn(plan.num_patches, 3 * processor.patch_size**2),
        image_grid_hw=torch.tensor([[plan.grid_height, plan.grid_width]]),
        image_token_hw=torch.tensor([[plan.token_height, plan.token_width]]),
        image_shuffle_factor=torch.tensor([plan.shuffle_factor]),
    )
    return {k: v.to(device) for k, v in inputs.items()}, plan


def _train_step(model, optimizer, inputs: dict) -> float:
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def report_setting(setting: dict, result: dict) -> None:
    mode = "on " if setting["checkpointing"] else "off"
    print(f"  long side {setting['long_side']:5d}, checkpointing {mode}: {result['peak_growth_mb']:8.1f} MB, "
          f"{result['step_seconds']:.2f} s", flush=True)


def run(long_sides, threads, device, max_image_tokens, tower, repeats=1, timeout=900) -> dict:
    settings = [
        dict(long_side=side, checkpointing=ckpt, threads=threads, device=device, max_image_tokens=max_image_tokens,
             tower=tower, timeout=timeout)
        for _ in range(repeats) for side in long_sides for ckpt in (False, True)  # alternating on / off
    ]
    measured = run_in_fresh_processes(measure, settings, report_setting)
    by_side = {}
    for side in long_sides:
        rows = {ckpt: [m for m in measured if m["long_side"] == side and m["checkpointing"] == ckpt]
                for ckpt in (False, True)}
        off, on = (min(r, key=lambda m: m["peak_growth_mb"]) for r in (rows[False], rows[True]))
        by_side[str(side)] = {
            "image_hw": off["image_hw"], "tower_patches": off["tower_patches"], "image_tokens": off["image_tokens"],
            "peak_growth_mb_off": off["peak_growth_mb"], "peak_growth_mb_on": on["peak_growth_mb"],
            "memory_ratio_on_over_off": on["peak_growth_mb"] / off["peak_growth_mb"],
            "step_seconds_off": min(m["step_seconds"] for m in rows[False]),
            "step_seconds_on": min(m["step_seconds"] for m in rows[True]),
        }
        by_side[str(side)]["time_ratio_on_over_off"] = (by_side[str(side)]["step_seconds_on"]
                                                        / by_side[str(side)]["step_seconds_off"])
    first, last = by_side[str(long_sides[0])], by_side[str(long_sides[-1])]
    growth = {
        "long_side": long_sides[-1] / long_sides[0],
        "tower_patches": last["tower_patches"] / first["tower_patches"],
        "memory_off": last["peak_growth_mb_off"] / first["peak_growth_mb_off"],
        "memory_on": last["peak_growth_mb_on"] / first["peak_growth_mb_on"],
        "step_time_off": last["step_seconds_off"] / first["step_seconds_off"],
        "step_time_on": last["step_seconds_on"] / first["step_seconds_on"],
    }
    return {
        "benchmark": "memory",
        "settings": {"long_sides": long_sides, "aspect": "4:3 landscape", "threads": threads, "device": device,
                     "max_image_tokens": max_image_tokens, "text_tokens": TEXT_TOKENS, "tower": tower,
                     "repeats": repeats, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")},
        "goal": {"memory_ratio_on_over_off_max": GOAL_RATIO, "at_long_side": long_sides[-1]},
        "by_long_side": by_side,
        "growth_first_to_last": growth,
        "measurements": measured,
        "environment": environment(),
    }


def report(figures: dict) -> str:
    s = figures["settings"]
    rows = []
    for f in figures["by_long_side"].values():
        rows.append([f"{f['image_hw'][0]}x{f['image_hw'][1]}", f["tower_patches"], f["image_tokens"],
                     round(f["peak_growth_mb_off"], 1), round(f["peak_growth_mb_on"], 1),
                     round(f["memory_ratio_on_over_off"], 2), round(f["step_seconds_off"], 2),
                     round(f["step_seconds_on"], 2), round(f["time_ratio_on_over_off"], 2)])
    tower = s["tower"]
    out = [table(["image", "patches", "img tokens", "MB ckpt off", "MB ckpt on", "on/off", "s/step off",
                  "s/step on", "time on/off"], rows,
                 title=f"One training step, 1 image + {s['text_tokens']} text tokens, max_image_tokens="
                       f"{s['max_image_tokens']}; tower hidden {tower['hidden_size']} x {tower['num_hidden_layers']} "
                       f"layers; {s['device']}, {s['threads']} thread(s); MB = peak memory growth during the step")]
    g = figures["growth_first_to_last"]
    out.append(f"long side x{g['long_side']:.0f} (patches x{g['tower_patches']:.0f}): memory x{g['memory_off']:.1f} "
               f"(ckpt off) / x{g['memory_on']:.1f} (on), step time x{g['step_time_off']:.1f} / "
               f"x{g['step_time_on']:.1f}")
    last = figures["by_long_side"][str(s["long_sides"][-1])]
    ok = last["memory_ratio_on_over_off"] <= figures["goal"]["memory_ratio_on_over_off_max"]
    out.append(f"goal: checkpointing on/off <= {GOAL_RATIO} at long side {s['long_sides'][-1]}: "
               f"{'met' if ok else 'MISSED'} ({last['memory_ratio_on_over_off']:.2f})")
    return "\n".join(out)


def plot(figures: dict, path: str) -> None:
    """Memory and step time against the long side, checkpointing off and on."""
    plt = pyplot()
    sides = [int(s) for s in figures["by_long_side"]]
    f = [figures["by_long_side"][str(s)] for s in sides]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_mem.plot(sides, [x["peak_growth_mb_off"] for x in f], "o-", label="checkpointing off", color="#b0b0b0")
    ax_mem.plot(sides, [x["peak_growth_mb_on"] for x in f], "o-", label="checkpointing on", color="#2f7ed8")
    for s, x in zip(sides, f):
        ax_mem.annotate(f"{x['memory_ratio_on_over_off']:.2f}x", (s, x["peak_growth_mb_on"]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8, color="#2f7ed8")
    ax_mem.set_xlabel("image long side (px), 4:3")
    ax_mem.set_ylabel("peak memory growth of one step (MB)")
    ax_mem.set_title("Memory (label: on / off)", fontsize=10)
    ax_mem.legend()
    ax_time.plot(sides, [x["step_seconds_off"] for x in f], "o-", label="checkpointing off", color="#b0b0b0")
    ax_time.plot(sides, [x["step_seconds_on"] for x in f], "o-", label="checkpointing on", color="#2f7ed8")
    ax_time.set_xlabel("image long side (px), 4:3")
    ax_time.set_ylabel("step time (s)")
    ax_time.set_title("Step time", fontsize=10)
    ax_time.legend()
    for ax in (ax_mem, ax_time):
        ax.set_xticks(sides)
        ax.grid(alpha=0.3)
    s = figures["settings"]
    fig.suptitle(f"One training step at a fixed budget of {s['max_image_tokens']} image tokens "
                 f"({s['device']}, tower hidden {s['tower']['hidden_size']} x {s['tower']['num_hidden_layers']})",
                 fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--long-sides", default="512,1024,1536,2048")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    parser.add_argument("--max-image-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (the lowest is kept)")
    parser.add_argument("--plot", metavar="PNG", help="write the chart here (full runs: docs/memory.png)")
    args = parser.parse_args(argv)
    long_sides = [128, 256] if args.quick else [int(s) for s in args.long_sides.split(",")]
    tower = QUICK_TOWER if args.quick else TOWER
    figures = run(long_sides, args.threads, args.device, args.max_image_tokens, tower, args.repeats)
    print(report(figures))
    write_json(args.json, figures)
    if args.plot:
        plot(figures, args.plot)
    return figures


if __name__ == "__main__":
    main()
