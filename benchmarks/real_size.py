"""Real-size figures: a ViT-S/16-shaped tower + SmolLM2-135M's LM (`small_config`, random weights), one training step
and greedy generation on one CPU, each setting in a fresh process.

    python benchmarks/real_size.py [--budgets 1024,256,64] [--threads 1] [--json PATH]

See docs/performance.md#real-size.
"""

from __future__ import annotations

import gc

from _common import (
    benchmark_main,
    image_batch,
    load_average,
    max_rss_mb,
    rss_mb,
    run_in_fresh_processes,
    set_torch_threads,
    table,
    timed,
    train_step,
)

IMAGE_HW = (768, 1024)
NEW_TOKENS = 64
OPTIONS = dict(budgets="1024,256,64", threads=1)


def measure(setting: dict) -> dict:
    """One training step (or a generation, `setting["kind"] == "generate"`) in this fresh process."""
    import torch

    from modeling_nanovlm import NanoVLMForConditionalGeneration, small_config
    from processing import NanoVLMImageProcessor

    set_torch_threads(setting["threads"])
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(small_config())
    processor = NanoVLMImageProcessor(max_image_tokens=setting["budget"], max_image_size=2048)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting["bf16"])
    image_token = model.config.image_token_id
    if setting["kind"] == "generate":
        return measure_generation(model, processor, autocast, setting["bf16"])
    if setting["checkpointing"]:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.config.text_config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # one autocast block for both steps: its cache of bf16 weights, made by the warm-up, outlives a single step
    with autocast:
        train_step(model, optimizer, image_batch(processor, 64, 64, image_token, "cpu")[0])
        inputs, plan = image_batch(processor, *IMAGE_HW, image_token, "cpu")
        gc.collect()
        before = rss_mb()
        seconds = timed(train_step, model, optimizer, inputs)[1]
    return {"budget": setting["budget"], "bf16": setting["bf16"], "checkpointing": setting["checkpointing"],
            "image_tokens": plan.num_tokens, "tower_patches": plan.num_patches, "step_seconds": seconds,
            "peak_growth_mb": max_rss_mb() - before, "baseline_mb": before}


def measure_generation(model, processor, autocast, bf16: bool) -> dict:
    """The prefill's seconds (a one-token generation) and the decoding speed from the KV cache."""
    import torch

    model.eval()
    inputs, plan = image_batch(processor, *IMAGE_HW, model.config.image_token_id, "cpu")
    inputs.pop("labels")

    def generate(new_tokens):
        return timed(model.generate, **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     do_sample=False)[1]

    with torch.no_grad(), autocast:
        generate(2)  # warm-up
        prefill = generate(1)
        total = generate(NEW_TOKENS + 1)
    return {"bf16": bf16, "prompt_tokens": int(inputs["input_ids"].shape[1]), "image_tokens": plan.num_tokens,
            "prefill_seconds": prefill, "tokens_per_second": NEW_TOKENS / (total - prefill)}


def run(args, timeout: int = 1800) -> dict:
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.quick:
        budgets = budgets[-1:]
    load_before = load_average()
    settings = [dict(kind="train", budget=budget, bf16=bf16, checkpointing=ckpt, threads=args.threads,
                     timeout=timeout)
                for budget in budgets for bf16 in (False, True) for ckpt in (False, True)]
    train = run_in_fresh_processes(measure, settings)
    generation = [dict(kind="generate", budget=256, bf16=bf16, threads=args.threads, timeout=timeout)
                  for bf16 in (False, True)]
    generate = run_in_fresh_processes(measure, generation)
    # other processes on shared cores slow single steps down unevenly: the load says how much to trust the times
    return {"threads": args.threads, "image_hw": list(IMAGE_HW), "train": train, "generate": generate,
            "load_average_before_after": load_before + load_average()}


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
    return benchmark_main(argv, __doc__, OPTIONS, None, run, report)


if __name__ == "__main__":
    main()
