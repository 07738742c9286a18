"""Greedy generation with an image in the prompt: KV cache vs no cache.

`model.generate(**processor(text, images), max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=...)`
on the tiny model (random weights, so `min_new_tokens` keeps it from stopping early). The prompt is one chat turn
with a 384x512 image (192 image tokens at the default budget) and a short question. Without a cache every new
token re-runs the whole sequence -- and the vision tower, since the pixels are passed again at every step. The
two modes alternate (after one short warm-up generation each); the median of each is kept. Both modes must
produce the same tokens (greedy), which the script checks.

    python benchmarks/generate.py [--new-tokens 128] [--repeats 2] [--json PATH]
"""

from __future__ import annotations

import time

import numpy as np

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import argument_parser, environment, median, table, write_json

GOAL_RATIO = 5.0


def run(new_tokens: int, repeats: int, image_hw: tuple[int, int], max_image_tokens: int, threads: int,
        seed: int, device: str) -> dict:
    import torch
    from PIL import Image

    from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config
    from processing import NanoVLMImageProcessor, NanoVLMProcessor
    from offline_tokenizer import build_tokenizer

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    tokenizer = build_tokenizer(["describe the picture: a cat, a cup of coffee, a rocket, a page of text."] * 10)
    processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=max_image_tokens, max_image_size=2048),
                                 tokenizer)
    torch.manual_seed(seed)
    model = NanoVLMForConditionalGeneration(
        tiny_config(vocab_size=len(tokenizer), image_token_id=processor.image_token_id)
    ).to(device).eval()
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*image_hw, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt").to(device)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int(inputs["image_token_hw"].prod(-1).sum())

    def generate(use_cache: bool, tokens: int):
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 use_cache=use_cache)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start, out

    for use_cache in (True, False):
        generate(use_cache, 4)  # warm-up
    seconds = {True: [], False: []}
    outputs = {}
    for repeat in range(repeats):
        for use_cache in ((True, False) if repeat % 2 == 0 else (False, True)):
            elapsed, out = generate(use_cache, new_tokens)
            seconds[use_cache].append(elapsed)
            outputs.setdefault(use_cache, out)
    generated = {k: int(v.shape[1]) - prompt_tokens for k, v in outputs.items()}
    cache_s, no_cache_s = median(seconds[True]), median(seconds[False])
    return {
        "benchmark": "generate",
        "settings": {"new_tokens": new_tokens, "repeats": repeats, "image_hw": list(image_hw),
                     "max_image_tokens": max_image_tokens, "prompt_tokens": prompt_tokens,
                     "image_tokens": image_tokens, "threads": threads, "device": device,
                     "model": "tiny_config (~1M parameters, random weights), fp32", "decoding": "greedy"},
        "goal": {"cache_speedup_min": GOAL_RATIO},
        "cache": {"seconds_median": cache_s, "seconds_all": seconds[True], "new_tokens": generated[True],
                  "tokens_per_second": generated[True] / cache_s},
        "no_cache": {"seconds_median": no_cache_s, "seconds_all": seconds[False], "new_tokens": generated[False],
                     "tokens_per_second": generated[False] / no_cache_s},
        "speedup": no_cache_s / cache_s,
        "same_tokens": bool(torch.equal(outputs[True].cpu(), outputs[False].cpu())),
        "environment": environment(),
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
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="generations per mode (alternating)")
    parser.add_argument("--image-size", default="384x512", help="height x width of the prompt's image")
    parser.add_argument("--max-image-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    image_hw = tuple(int(x) for x in args.image_size.lower().split("x"))
    if args.quick:
        args.new_tokens, args.repeats, image_hw = 16, 1, (96, 128)
    figures = run(args.new_tokens, args.repeats, image_hw, args.max_image_tokens, args.threads, args.seed,
                  args.device)
    print(report(figures))
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
