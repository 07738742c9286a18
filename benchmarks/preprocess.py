"""Image preprocessing speed: nanoVLM's processor against the decode + resize floor and transformers' processors.

    python benchmarks/preprocess.py [--settings 1024:2048,256:1024] [--rounds 3] [--json PATH]

See docs/performance.md#preprocessing.
"""

from __future__ import annotations

import io
import math

import numpy as np

from _common import benchmark_main, encoded_photos, rotated, table, timed

PHOTO_SIZES = ((640, 480), (1024, 768), (1600, 1200), (2048, 1536), (3000, 2000))  # (width, height) landscape
IDEFICS3_TILE, IDEFICS3_TOKENS_PER_TILE = 364, 169  # 26x26 patches of 14 px, pixel-shuffled by 2
QWEN2_VL_FACTOR = 28  # 14-px patches merged 2x2: one token per 28x28 pixels
GOAL_RATIO = 1.5
OPTIONS = dict(settings="1024:2048,256:1024", rounds=3, threads=1)


# --- methods: each maps JPEG bytes to (image tokens, bytes of pixel data it hands on) ----------------------------


def decode_only(data: bytes, plan):
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    return 0, image.width * image.height * 3


def decode_resize_floor(data: bytes, plan):
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = image.resize((plan.resized_width, plan.resized_height), Image.BICUBIC)
    return plan.num_tokens, image.width * image.height * 3


def previous_processor(ip):
    """The pixel path of NanoVLMImageProcessor before this benchmark (same plan), verbatim."""
    from PIL import Image, ImageOps

    mean, std = np.asarray(ip.image_mean, np.float32), np.asarray(ip.image_std, np.float32)

    def run(data: bytes, plan):
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
        image = ImageOps.exif_transpose(image).convert("RGB")
        resized = image.resize((plan.resized_width, plan.resized_height), resample=ip.resample)
        pixels = np.asarray(resized, dtype=np.float32) / 255.0
        pixels = (pixels - mean) / std
        p = ip.patch_size
        patches = pixels.reshape(plan.grid_height, p, plan.grid_width, p, 3).transpose(0, 2, 4, 1, 3)
        patches = patches.reshape(plan.num_patches, 3 * p * p)
        return plan.num_tokens, patches.nbytes

    return run


def ours(ip):
    def run(data: bytes, plan):
        out = ip(data)
        return int(np.prod(out["image_token_hw"], axis=-1).sum()), out["pixel_values"].nbytes

    return run


def qwen2_vl(processor):
    from PIL import Image

    def run(data: bytes, plan):
        out = processor(images=[Image.open(io.BytesIO(data))], return_tensors="np")
        return int(np.prod(out["image_grid_thw"], axis=-1).sum()) // 4, out["pixel_values"].nbytes

    return run


def idefics3(processor):
    from PIL import Image

    def run(data: bytes, plan):
        out = processor(images=[[Image.open(io.BytesIO(data))]], return_tensors="np")
        tiles = out["pixel_values"].shape[1]
        return tiles * IDEFICS3_TOKENS_PER_TILE, out["pixel_values"].nbytes + out["pixel_attention_mask"].nbytes

    return run


def qwen2_vl_tokens(height: int, width: int, max_pixels: int) -> int:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=QWEN2_VL_FACTOR, min_pixels=56 * 56, max_pixels=max_pixels)
    return (h // QWEN2_VL_FACTOR) * (w // QWEN2_VL_FACTOR)


def idefics3_tokens(height: int, width: int, longest_edge: int) -> int:
    """Tiles + the global view, 169 tokens each (Idefics3's resize: long side to `longest_edge`, sides rounded up
    to whole tiles; a single tile gets no global view)."""
    scale = longest_edge / max(height, width)
    tiles = math.ceil(height * scale / IDEFICS3_TILE) * math.ceil(width * scale / IDEFICS3_TILE)
    return IDEFICS3_TOKENS_PER_TILE * (tiles + 1 if tiles > 1 else 1)


def matched_baselines(photos: list[dict], our_tokens: float) -> dict:
    """Qwen2-VL and Idefics3 settings whose mean tokens per image on these photos are closest to ours."""
    sizes = [(p["height"], p["width"]) for p in photos]
    qwen_candidates = [int(our_tokens * f) * QWEN2_VL_FACTOR**2 for f in np.linspace(0.5, 2.0, 61)]
    qwen_max_pixels = min(qwen_candidates,
                          key=lambda m: abs(np.mean([qwen2_vl_tokens(h, w, m) for h, w in sizes]) - our_tokens))
    idefics_edge = min((IDEFICS3_TILE * k for k in range(1, 9)),
                       key=lambda e: abs(np.mean([idefics3_tokens(h, w, e) for h, w in sizes]) - our_tokens))
    return {"qwen2_vl_max_pixels": qwen_max_pixels, "idefics3_longest_edge": idefics_edge}


def fast_variants_status() -> dict:
    """Whether transformers' torchvision backends can run here (they need torchvision)."""
    try:
        import torchvision  # noqa: F401

        return {"available": True, "reason": None}
    except Exception as error:  # noqa: BLE001  (any import failure means: not available)
        return {"available": False,
                "reason": f"torchvision does not import ({type(error).__name__}: {error}); the torchvision "
                          "backends (transformers' default Qwen2VLImageProcessor / Idefics3ImageProcessor) were "
                          "not run; installing torchvision would replace the pinned torch 2.13.0"}


def build_methods(settings: dict, photos: list[dict], fast: bool) -> tuple[dict, object, dict]:
    """The methods for one budget, its image processor, and the baselines' matched settings."""
    import transformers

    from processing import NanoVLMImageProcessor

    ip = NanoVLMImageProcessor(**settings)
    matched = matched_baselines(photos, float(np.mean([ip.num_image_tokens(p["height"], p["width"]) for p in photos])))
    qwen_kwargs = {"max_pixels": matched["qwen2_vl_max_pixels"]}
    idefics_kwargs = {"size": {"longest_edge": matched["idefics3_longest_edge"]}}
    methods = {
        "decode": decode_only,
        "floor (decode + resize)": decode_resize_floor,
        "ours float32": ours(ip),
        "ours uint8": ours(NanoVLMImageProcessor(**settings, pixel_dtype="uint8")),
        "ours full decode": ours(NanoVLMImageProcessor(**settings, reduced_jpeg_decode=False)),
        "previous": previous_processor(ip),
        "qwen2-vl (PIL)": qwen2_vl(transformers.Qwen2VLImageProcessorPil(**qwen_kwargs)),
        "idefics3 (PIL)": idefics3(transformers.Idefics3ImageProcessorPil(**idefics_kwargs)),
    }
    if fast:
        methods["qwen2-vl (torchvision)"] = qwen2_vl(transformers.Qwen2VLImageProcessor(**qwen_kwargs))
        methods["idefics3 (torchvision)"] = idefics3(transformers.Idefics3ImageProcessor(**idefics_kwargs))
    return methods, ip, matched


def measure(methods: dict, photos: list[dict], ip, rounds: int) -> dict:
    """Per method: seconds, images, tokens, pixel bytes over `rounds` passes; methods alternate photo by photo."""
    totals = {name: {"seconds": 0.0, "images": 0, "tokens": 0, "pixel_bytes": 0} for name in methods}
    for turn, photo in enumerate(photos * rounds):
        plan = ip.plan(photo["height"], photo["width"])
        for name in rotated(list(methods), turn):
            (tokens, pixel_bytes), seconds = timed(methods[name], photo["bytes"], plan)
            totals[name]["seconds"] += seconds
            totals[name]["images"] += 1
            totals[name]["tokens"] += tokens
            totals[name]["pixel_bytes"] += pixel_bytes
    return {name: {"ms_per_image": 1000 * t["seconds"] / t["images"],
                   "images_per_second": t["images"] / t["seconds"],
                   "image_tokens_per_second": t["tokens"] / t["seconds"] if t["tokens"] else None,
                   "tokens_per_image": t["tokens"] / t["images"] if t["tokens"] else None,
                   "pixel_mb_per_image": t["pixel_bytes"] / t["images"] / 2**20}
            for name, t in totals.items()}


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    settings = [tuple(int(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    num_sources, sizes = None, PHOTO_SIZES
    if args.quick:
        args.rounds, num_sources, sizes, settings = 1, 2, PHOTO_SIZES[:2], settings[:1]
    photos = encoded_photos(num_sources, sizes)
    fast = fast_variants_status()
    results = {}
    for budget, max_image_size in settings:
        methods, ip, matched = build_methods({"max_image_tokens": budget, "max_image_size": max_image_size}, photos,
                                             fast["available"])
        for method in methods.values():  # warm-up: imports, first-call costs
            method(photos[0]["bytes"], ip.plan(photos[0]["height"], photos[0]["width"]))
        by_method = measure(methods, photos, ip, args.rounds)
        floor = by_method["floor (decode + resize)"]["ms_per_image"]
        results[f"{budget}:{max_image_size}"] = {
            "max_image_tokens": budget, "max_image_size": max_image_size, **matched, "methods": by_method,
            "ratio_to_floor": {name: m["ms_per_image"] / floor for name, m in by_method.items()},
        }
    return {
        "benchmark": "preprocess",
        "settings": {"budgets": [f"{b}:{m}" for b, m in settings], "rounds": args.rounds, "photos": len(photos),
                     "photo_sizes": [f"{w}x{h}" for w, h in sizes], "jpeg_quality": 90, "torch_threads": args.threads,
                     "one_image_per_call": True},
        "goal": {"ours_float32_vs_floor_max": GOAL_RATIO},
        "budgets": results,
        "fast_variants": fast,
    }


def report(figures: dict) -> str:
    s = figures["settings"]
    out = []
    for r in figures["budgets"].values():
        rows = [[name, round(m["ms_per_image"], 1), round(m["images_per_second"], 1),
                 None if m["image_tokens_per_second"] is None else round(m["image_tokens_per_second"]),
                 None if m["tokens_per_image"] is None else round(m["tokens_per_image"]),
                 round(m["pixel_mb_per_image"], 2), f"{r['ratio_to_floor'][name]:.2f}x"]
                for name, m in r["methods"].items()]
        out.append(table(
            ["method", "ms/image", "images/s", "image tokens/s", "tokens/image", "pixel MB/image", "x floor"], rows,
            title=f"Preprocessing, budget {r['max_image_tokens']} tokens, max side {r['max_image_size']}: "
                  f"{s['photos']} JPEG photos ({', '.join(s['photo_sizes'])}), {s['rounds']} round(s), "
                  f"one image per call, {s['torch_threads']} torch thread(s); "
                  f"qwen2-vl max_pixels={r['qwen2_vl_max_pixels']}, "
                  f"idefics3 longest_edge={r['idefics3_longest_edge']}"))
        ratio = r["ratio_to_floor"]["ours float32"]
        goal = figures["goal"]["ours_float32_vs_floor_max"]
        out.append(f"goal ours float32 <= {goal}x the floor: {'met' if ratio <= goal else 'MISSED'} ({ratio:.2f}x); "
                   f"uint8 transport {r['ratio_to_floor']['ours uint8']:.2f}x; previous processor "
                   f"{r['ratio_to_floor']['previous']:.2f}x\n")
    fast = figures["fast_variants"]
    out.append("torchvision backends: " + ("run (rows marked torchvision)" if fast["available"] else fast["reason"]))
    return "\n".join(out)


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, OPTIONS, None, run, report)


if __name__ == "__main__":
    main()
