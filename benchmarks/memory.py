"""Peak memory and step time of one training step vs the image's long side, gradient checkpointing off and on.

    python benchmarks/memory.py [--long-sides 512,1024,1536,2048] [--json PATH] [--plot docs/memory.png]

See docs/performance.md#memory.
"""

from __future__ import annotations

import gc
import os
import time

from _common import (
    benchmark_main,
    cuda_available,
    image_batch,
    max_rss_mb,
    pyplot,
    rss_mb,
    run_in_fresh_processes,
    save_figure,
    set_torch_threads,
    table,
    train_step,
)

GOAL_RATIO = 0.4
TEXT_TOKENS = 64
TOWER = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3)
QUICK_TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
OPTIONS = dict(long_sides="512,1024,1536,2048", threads=1, device="cuda" if cuda_available() else "cpu",
               max_image_tokens=256, repeats=1, plot="")
QUICK = dict(long_sides="128,256")


def measure(setting: dict) -> dict:
    """One training step at `setting` in this (fresh) process: peak memory growth and seconds."""
    import torch

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
    image_token = model.config.image_token_id
    train_step(model, optimizer, image_batch(processor, 64, 64, image_token, device)[0])  # warm-up
    long_side = setting["long_side"]
    inputs, plan = image_batch(processor, long_side * 3 // 4, long_side, image_token, device, TEXT_TOKENS)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    start = time.perf_counter()
    loss = train_step(model, optimizer, inputs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else max_rss_mb()
    return {
        "long_side": long_side, "checkpointing": setting["checkpointing"],
        "image_hw": [long_side * 3 // 4, long_side], "tower_patches": plan.num_patches, "image_tokens": plan.num_tokens,
        "peak_growth_mb": peak - before, "baseline_mb": before, "step_seconds": seconds, "loss": loss,
        "memory_measure": "cuda max_memory_allocated" if cuda else "max RSS (getrusage) growth",
    }


def report_setting(setting: dict, result: dict) -> None:
    mode = "on " if setting["checkpointing"] else "off"
    print(f"  long side {setting['long_side']:5d}, checkpointing {mode}: {result['peak_growth_mb']:8.1f} MB, "
          f"{result['step_seconds']:.2f} s", flush=True)


def run(args, timeout=900) -> dict:
    long_sides = [int(s) for s in args.long_sides.split(",")]
    tower = QUICK_TOWER if args.quick else TOWER
    settings = [
        dict(long_side=side, checkpointing=ckpt, threads=args.threads, device=args.device,
             max_image_tokens=args.max_image_tokens, tower=tower, timeout=timeout)
        for _ in range(args.repeats) for side in long_sides for ckpt in (False, True)  # alternating on / off
    ]
    measured = run_in_fresh_processes(measure, settings, report_setting)
    by_side = {}
    for side in long_sides:
        off = [m for m in measured if m["long_side"] == side and not m["checkpointing"]]
        on = [m for m in measured if m["long_side"] == side and m["checkpointing"]]
        lowest_off, lowest_on = (min(r, key=lambda m: m["peak_growth_mb"]) for r in (off, on))
        seconds_off, seconds_on = min(m["step_seconds"] for m in off), min(m["step_seconds"] for m in on)
        by_side[str(side)] = {
            "image_hw": lowest_off["image_hw"], "tower_patches": lowest_off["tower_patches"],
            "image_tokens": lowest_off["image_tokens"],
            "peak_growth_mb_off": lowest_off["peak_growth_mb"], "peak_growth_mb_on": lowest_on["peak_growth_mb"],
            "memory_ratio_on_over_off": lowest_on["peak_growth_mb"] / lowest_off["peak_growth_mb"],
            "step_seconds_off": seconds_off, "step_seconds_on": seconds_on,
            "time_ratio_on_over_off": seconds_on / seconds_off,
        }
    first, last = by_side[str(long_sides[0])], by_side[str(long_sides[-1])]
    growth = {"long_side": long_sides[-1] / long_sides[0]}
    for name, key in (("tower_patches", "tower_patches"), ("memory_off", "peak_growth_mb_off"),
                      ("memory_on", "peak_growth_mb_on"), ("step_time_off", "step_seconds_off"),
                      ("step_time_on", "step_seconds_on")):
        growth[name] = last[key] / first[key]
    return {
        "benchmark": "memory",
        "settings": {"long_sides": long_sides, "aspect": "4:3 landscape", "threads": args.threads,
                     "device": args.device, "max_image_tokens": args.max_image_tokens, "text_tokens": TEXT_TOKENS,
                     "tower": tower, "repeats": args.repeats,
                     "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")},
        "goal": {"memory_ratio_on_over_off_max": GOAL_RATIO, "at_long_side": long_sides[-1]},
        "by_long_side": by_side,
        "growth_first_to_last": growth,
        "measurements": measured,
    }


def report(figures: dict) -> str:
    s, tower = figures["settings"], figures["settings"]["tower"]
    rows = [[f"{f['image_hw'][0]}x{f['image_hw'][1]}", f["tower_patches"], f["image_tokens"],
             round(f["peak_growth_mb_off"], 1), round(f["peak_growth_mb_on"], 1),
             round(f["memory_ratio_on_over_off"], 2), round(f["step_seconds_off"], 2),
             round(f["step_seconds_on"], 2), round(f["time_ratio_on_over_off"], 2)]
            for f in figures["by_long_side"].values()]
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
    f = list(figures["by_long_side"].values())
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((ax_mem, "peak_growth_mb", "peak memory growth of one step (MB)", "Memory (label: on / off)"),
              (ax_time, "step_seconds", "step time (s)", "Step time"))
    for ax, key, ylabel, title in panels:
        ax.plot(sides, [x[f"{key}_off"] for x in f], "o-", label="checkpointing off", color="#b0b0b0")
        ax.plot(sides, [x[f"{key}_on"] for x in f], "o-", label="checkpointing on", color="#2f7ed8")
        ax.set_xlabel("image long side (px), 4:3")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend()
        ax.set_xticks(sides)
        ax.grid(alpha=0.3)
    for s, x in zip(sides, f):
        ax_mem.annotate(f"{x['memory_ratio_on_over_off']:.2f}x", (s, x["peak_growth_mb_on"]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8, color="#2f7ed8")
    s = figures["settings"]
    fig.suptitle(f"One training step at a fixed budget of {s['max_image_tokens']} image tokens "
                 f"({s['device']}, tower hidden {s['tower']['hidden_size']} x {s['tower']['num_hidden_layers']})",
                 fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, OPTIONS, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
