"""Greedy generation with an image in the prompt: KV cache vs no cache, on the tiny model.

    python benchmarks/generate.py [--new-tokens 128] [--repeats 2] [--json PATH]

See docs/performance.md#generation.
"""

from __future__ import annotations

import time

import numpy as np

from _common import benchmark_main, median, rotated, set_torch_threads, table, tiny_model

GOAL_RATIO = 5.0
OPTIONS = dict(new_tokens=128, repeats=2, image_size="384x512", max_image_tokens=256, threads=1, device="cpu")
QUICK = dict(new_tokens=16, repeats=1, image_size="96x128")


def run(args) -> dict:
    import torch
    from PIL import Image

    from processing import NanoVLMImageProcessor, NanoVLMProcessor

    from offline_tokenizer import build_tokenizer

    set_torch_threads(args.threads)
    tokenizer = build_tokenizer(["describe the picture: a cat, a cup of coffee, a rocket, a page of text."] * 10)
    processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=args.max_image_tokens, max_image_size=2048),
                                 tokenizer)
    model = tiny_model(tokenizer, processor.image_token_id, args.seed).to(args.device).eval()
    image_hw = tuple(int(x) for x in args.image_size.lower().split("x"))
    image = Image.fromarray(np.random.default_rng(args.seed).integers(0, 256, (*image_hw, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt").to(args.device)
    prompt_tokens = int(inputs["input_ids"].shape[1])

    def generate(use_cache: bool, tokens: int):
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 use_cache=use_cache)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start, out

    for use_cache in (True, False):
        generate(use_cache, 4)  # warm-up
    seconds, outputs = {True: [], False: []}, {}
    for repeat in range(args.repeats):
        for use_cache in rotated([True, False], repeat):
            elapsed, outputs[use_cache] = generate(use_cache, args.new_tokens)
            seconds[use_cache].append(elapsed)
    modes = {}
    for key, use_cache in (("cache", True), ("no_cache", False)):
        new_tokens = int(outputs[use_cache].shape[1]) - prompt_tokens
        modes[key] = {"seconds_median": median(seconds[use_cache]), "seconds_all": seconds[use_cache],
                      "new_tokens": new_tokens, "tokens_per_second": new_tokens / median(seconds[use_cache])}
    return {
        "benchmark": "generate",
        "settings": {"new_tokens": args.new_tokens, "repeats": args.repeats, "image_hw": list(image_hw),
                     "max_image_tokens": args.max_image_tokens, "prompt_tokens": prompt_tokens,
                     "image_tokens": int(inputs["image_token_hw"].prod(-1).sum()), "threads": args.threads,
                     "device": args.device, "model": "tiny_config (~1M parameters, random weights), fp32",
                     "decoding": "greedy"},
        "goal": {"cache_speedup_min": GOAL_RATIO},
        **modes,
        "speedup": modes["no_cache"]["seconds_median"] / modes["cache"]["seconds_median"],
        "same_tokens": bool(torch.equal(outputs[True].cpu(), outputs[False].cpu())),
    }


def report(figures: dict) -> str:
    s = figures["settings"]
    rows = [[mode, figures[key]["new_tokens"], round(figures[key]["seconds_median"], 3),
             round(figures[key]["tokens_per_second"], 1)]
            for mode, key in (("KV cache", "cache"), ("no cache", "no_cache"))]
    out = [table(["mode", "new tokens", "seconds (median)", "tokens/s"], rows,
                 title=f"Greedy generation of {s['new_tokens']} tokens, tiny model, prompt {s['prompt_tokens']} tokens "
                       f"({s['image_tokens']} image tokens from a {s['image_hw'][0]}x{s['image_hw'][1]} image); "
                       f"{s['device']}, {s['threads']} thread(s), median of {s['repeats']} alternating runs")]
    ok = figures["speedup"] >= figures["goal"]["cache_speedup_min"]
    out.append(f"KV cache speedup: {figures['speedup']:.1f}x (goal >= {GOAL_RATIO:.0f}x: {'met' if ok else 'MISSED'}); "
               f"same tokens with and without cache: {figures['same_tokens']}")
    return "\n".join(out)


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, OPTIONS, QUICK, run, report)


if __name__ == "__main__":
    main()
