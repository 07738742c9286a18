"""Real-size figures on this machine: a ViT-S/16-shaped tower + SmolLM2-135M's LM (`small_config`, random weights --
the shapes set the cost, not the values).

Training: one step (forward + backward + AdamW over every parameter) on one 1024x768 photo's tokens + 64 text
tokens, at image-token budgets 1024 / 256 / 64 (768 / 192 / 48 image tokens; the tower always sees the same 3072
patches), in float32 and under bf16 autocast, with activation checkpointing off and on. Each setting runs in a fresh
process (memory.py's server), after one warm-up step on a small image; memory is the growth of peak RSS during
the step. Generation: the prefill's seconds and the decoding speed (tokens/s of 64 greedy tokens from the KV cache)
after a prompt with the photo at budget 256, in float32 and under bf16 autocast. Shared cores make single figures
noisy: compare within one run.

    python benchmarks/real_size.py [--budgets 1024,256,64] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import sys
import time

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import (
    REPO_ROOT,
    argument_parser,
    environment,
    run_in_fresh_processes,
    set_torch_threads,
    table,
    write_json,
)

IMAGE_HW = (768, 1024)
NEW_TOKENS = 64


def _enable_checkpointing(model) -> None:
    # transformers 5.x renamed it; the old name warns (FutureWarning) where the new one exists
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _build(setting: dict):
    import torch

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from modeling_nanovlm import NanoVLMForConditionalGeneration, small_config
    from processing import NanoVLMImageProcessor

    set_torch_threads(setting["threads"])
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(small_config())
    processor = NanoVLMImageProcessor(max_image_tokens=setting["budget"], max_image_size=2048)
    return model, processor


def measure(setting: dict) -> dict:
    """One training step (or a generation, `setting["kind"] == "generate"`) in this fresh process."""
    import gc

    import torch
    from memory import _max_rss_mb, _one_image_batch, _rss_mb, _train_step

    model, processor = _build(setting)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting["bf16"])
    image_token = model.config.image_token_id
    if setting["kind"] == "generate":
        model.eval()
        inputs, plan = _one_image_batch(processor, *IMAGE_HW, image_token, "cpu")
        inputs.pop("labels")
        def timed(new_tokens):
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            return time.perf_counter() - start

        with torch.no_grad(), autocast:
            timed(2)  # warm-up
            # the prefill (tower over 3072 patches + prompt) is a one-token call; the rest decodes from the cache
            prefill = timed(1)
            total = timed(NEW_TOKENS + 1)
        return {"bf16": setting["bf16"], "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "image_tokens": plan.num_tokens, "prefill_seconds": prefill,
                "tokens_per_second": NEW_TOKENS / (total - prefill)}
    if setting["checkpointing"]:
        _enable_checkpointing(model)
    model.config.text_config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with autocast:
        _train_step(model, optimizer, _one_image_batch(processor, 64, 64, image_token, "cpu")[0])
        inputs, plan = _one_image_batch(processor, *IMAGE_HW, image_token, "cpu")
        gc.collect()
        before = _rss_mb()
        start = time.perf_counter()
        _train_step(model, optimizer, inputs)
        seconds = time.perf_counter() - start
    return {**{k: setting[k] for k in ("budget", "bf16", "checkpointing")}, "image_tokens": plan.num_tokens,
            "tower_patches": plan.num_patches, "step_seconds": seconds, "peak_growth_mb": _max_rss_mb() - before,
            "baseline_mb": before}


def run(budgets, threads: int, timeout: int = 1800) -> dict:
    import os

    load_before = os.getloadavg()
    settings = [dict(kind="train", budget=budget, bf16=bf16, checkpointing=ckpt, threads=threads, timeout=timeout)
                for budget in budgets for bf16 in (False, True) for ckpt in (False, True)]
    train = run_in_fresh_processes(measure, settings)
    generation = [dict(kind="generate", budget=256, bf16=bf16, threads=threads, timeout=timeout)
                  for bf16 in (False, True)]
    generate = run_in_fresh_processes(measure, generation)
    # other processes on shared cores slow single steps down unevenly: the load says how much to trust the times
    load = [round(value, 2) for value in (*load_before, *os.getloadavg())]
    return {"environment": environment(), "threads": threads, "image_hw": list(IMAGE_HW), "train": train,
            "generate": generate, "load_average_before_after": load}


def report(figures: dict) -> str:
    rows = [[f["budget"], f["image_tokens"], "bf16 autocast" if f["bf16"] else "float32",
             "on" if f["checkpointing"] else "off", round(f["step_seconds"], 2), round(f["peak_growth_mb"])]
            for f in figures["train"]]
    text = table(["budget", "image tokens", "precision", "checkpointing", "s / step", "peak growth MB"], rows,
                 title=f"training step, ViT-S/16 tower + SmolLM2-135M, {figures['image_hw'][1]}x"
                       f"{figures['image_hw'][0]} photo, {figures['threads']} thread(s)")
    rows = [["bf16 autocast" if f["bf16"] else "float32", f["prompt_tokens"], round(f["prefill_seconds"], 2),
             round(f["tokens_per_second"], 1)] for f in figures["generate"]]
    return text + "\n\n" + table(["precision", "prompt tokens", "prefill s", "decoded tokens / s"], rows,
                                 title=f"greedy generation with the KV cache, {NEW_TOKENS} new tokens, budget 256")


def main(argv=None) -> dict:
    parser = argument_parser(__doc__)
    parser.add_argument("--budgets", default="1024,256,64")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.quick:
        budgets = budgets[-1:]
    figures = run(budgets, args.threads)
    print(report(figures))
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
