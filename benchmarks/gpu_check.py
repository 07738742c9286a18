"""One short GPU check of a training step: step time, tokens/s, peak memory and model-FLOPs utilisation (MFU).

The `small_config` preset (shapes of DINOv3 ViT-S/16 + SmolLM2-135M, random weights), a batch of rows that each
hold one 4:3 image with a 2048-px long side (1536x2048: 12288 tower patches, 768 image tokens at the default
budget of 1024) and 256 text tokens, bf16 autocast, gradient checkpointing, AdamW. After `--warmup` steps,
`--steps` steps are timed (CUDA-synchronised); the median is reported.

Model FLOPs per step (MFU counts these, not the recomputation that checkpointing adds), PaLM-style:
  6 x (matmul weights used) x tokens            for the tower (patches + CLS/registers), connector, LM (with
                                                 lm_head; embedding lookups are free)
  + 12 x layers x sequence^2 x hidden           attention, per image in the tower and per row in the LM
MFU = model FLOPs / step time / the GPU's dense bf16 peak (known GPUs, or `--peak-tflops`).

With `--compare-no-checkpointing` the same batch is also run with checkpointing off (memory ratio on/off).
On CPU (`--device cpu --quick`) it runs the tiny preset on a small image: that only tests the script.

    python benchmarks/gpu_check.py --device cuda --preset small --bf16 --checkpointing --long-side 2048 --json PATH
"""

from __future__ import annotations

import time

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import argument_parser, environment, median, table, write_json

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
    "GH200": 989.4, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # insertion order: the most specific names first
        if key in device_name:
            return value
    return None


def _matmul_weights(module) -> int:
    from torch import nn

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def model_flops(model, plans, rows: int, seq_len: int) -> dict:
    """Model FLOPs of one training step (forward + backward), split by part."""
    from torch import nn

    vision, text = model.config.vision_config, model.config.text_config
    prefix = 1 + vision.num_register_tokens
    conv = sum(m.weight.numel() for m in model.vision_tower.modules() if isinstance(m, nn.Conv2d))
    encoder = _matmul_weights(model.vision_tower) - conv
    tower = sum(6 * (encoder * (p.num_patches + prefix) + conv * p.num_patches)
                + 12 * vision.num_hidden_layers * (p.num_patches + prefix) ** 2 * vision.hidden_size for p in plans)
    connector = 0
    for p in plans:
        projection = model.connector.projections[str(p.shuffle_factor)]
        connector += 6 * _matmul_weights(projection) * p.num_tokens
    lm_weights = _matmul_weights(model.language_model) + model.lm_head.weight.numel()
    lm = rows * (6 * lm_weights * seq_len + 12 * text.num_hidden_layers * seq_len**2 * text.hidden_size)
    return {"tower": tower, "connector": connector, "lm": lm, "total": tower + connector + lm}


def build_batch(processor, rows: int, image_hw, text_tokens: int, image_token_id: int, vocab_size: int, device):
    import torch

    plan = processor.plan(*image_hw)
    seq_len = plan.num_tokens + text_tokens
    ids = torch.randint(image_token_id + 1, vocab_size, (rows, seq_len)) if image_token_id + 1 < vocab_size \
        else torch.randint(0, image_token_id, (rows, seq_len))
    ids[:, 2 : 2 + plan.num_tokens] = image_token_id
    labels = ids.clone()
    labels[:, : 2 + plan.num_tokens] = -100  # loss on the text after the image, as the collator's answers
    batch = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
        pixel_values=torch.randn(rows * plan.num_patches, 3 * processor.patch_size**2),
        image_grid_hw=torch.tensor([[plan.grid_height, plan.grid_width]] * rows),
        image_token_hw=torch.tensor([[plan.token_height, plan.token_width]] * rows),
        image_shuffle_factor=torch.tensor([plan.shuffle_factor] * rows),
    )
    return {k: v.to(device) for k, v in batch.items()}, [plan] * rows, seq_len


def _train_step(model, optimizer, autocast, batch: dict):
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(model, batch, device, bf16: bool, checkpointing: bool, warmup: int, steps: int) -> dict:
    """Median step time (after `warmup` steps), peak memory and the last loss, checkpointing on or off."""
    import torch

    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    model.train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for _ in range(warmup):
        _train_step(model, optimizer, autocast, batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(steps):
        start = time.perf_counter()
        loss = _train_step(model, optimizer, autocast, batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del optimizer
    if cuda:
        torch.cuda.empty_cache()
    return {"step_seconds_median": median(times), "step_seconds_all": times, "peak_memory_gib": peak,
            "loss": float(loss.detach())}


def run(preset: str, device_name: str, bf16: bool, checkpointing: bool, compare: bool, long_side: int,
        batch_size: int, text_tokens: int, max_image_tokens: int, warmup: int, steps: int,
        peak: float | None) -> dict:
    import torch

    from modeling_nanovlm import NanoVLMForConditionalGeneration, small_config, tiny_config
    from processing import NanoVLMImageProcessor

    device = torch.device(device_name)
    torch.manual_seed(0)
    config = small_config() if preset == "small" else tiny_config()
    model = NanoVLMForConditionalGeneration(config).to(device)
    model.config.text_config.use_cache = False
    processor = NanoVLMImageProcessor(max_image_tokens=max_image_tokens, max_image_size=max(2048, long_side))
    image_hw = (long_side * 3 // 4, long_side)
    batch, plans, seq_len = build_batch(processor, batch_size, image_hw, text_tokens, config.image_token_id,
                                        config.text_config.vocab_size, device)
    flops = model_flops(model, plans, batch_size, seq_len)
    parameters = sum(p.numel() for p in model.parameters())

    main = measure(model, batch, device, bf16, checkpointing, warmup, steps)
    other = measure(model, batch, device, bf16, not checkpointing, warmup, max(1, steps // 2)) if compare else None

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak if peak is not None else (peak_tflops(gpu) if gpu else None)
    seconds = main["step_seconds_median"]
    achieved = flops["total"] / seconds / 1e12
    figures = {
        "benchmark": "gpu_check",
        "settings": {"preset": preset, "parameters": parameters, "device": device_name, "gpu": gpu, "bf16": bf16,
                     "checkpointing": checkpointing, "batch_size": batch_size, "image_hw": list(image_hw),
                     "tower_patches_per_image": plans[0].num_patches, "image_tokens_per_image": plans[0].num_tokens,
                     "shuffle_factor": plans[0].shuffle_factor, "text_tokens": text_tokens, "sequence_length": seq_len,
                     "max_image_tokens": max_image_tokens, "warmup": warmup, "steps": steps,
                     "peak_bf16_tflops": peak},
        "step_seconds": seconds,
        "step_seconds_all": main["step_seconds_all"],
        "samples_per_second": batch_size / seconds,
        "lm_tokens_per_second": batch_size * seq_len / seconds,
        "tower_patches_per_second": batch_size * plans[0].num_patches / seconds,
        "peak_memory_gib": main["peak_memory_gib"],
        "model_flops_per_step": flops,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "loss": main["loss"],
        "environment": environment(),
    }
    if other is not None:
        label = "without_checkpointing" if checkpointing else "with_checkpointing"
        figures[label] = other
        if main["peak_memory_gib"] and other["peak_memory_gib"]:
            on, off = (main, other) if checkpointing else (other, main)
            figures["memory_ratio_checkpointing_on_over_off"] = on["peak_memory_gib"] / off["peak_memory_gib"]
            figures["time_ratio_checkpointing_on_over_off"] = on["step_seconds_median"] / off["step_seconds_median"]
    return figures


def report(figures: dict) -> str:
    s = figures["settings"]
    mem = figures["peak_memory_gib"]
    rows = [
        ["device", s["gpu"] or s["device"]],
        ["model", f"{s['preset']} preset, {s['parameters'] / 1e6:.1f} M parameters, random weights"],
        ["batch", f"{s['batch_size']} x ({s['image_hw'][0]}x{s['image_hw'][1]} image = "
                  f"{s['tower_patches_per_image']} patches -> {s['image_tokens_per_image']} tokens "
                  f"(s={s['shuffle_factor']}) + {s['text_tokens']} text)"],
        ["precision / checkpointing",
         f"{'bf16 autocast' if s['bf16'] else 'fp32'} / {'on' if s['checkpointing'] else 'off'}"],
        ["step time (median)", f"{figures['step_seconds']:.3f} s"],
        ["samples/s", f"{figures['samples_per_second']:.2f}"],
        ["LM tokens/s", f"{figures['lm_tokens_per_second']:,.0f}"],
        ["tower patches/s", f"{figures['tower_patches_per_second']:,.0f}"],
        ["peak memory", "n/a (CPU)" if mem is None else f"{mem:.2f} GiB"],
        ["model FLOPs/step", f"{_flops(figures['model_flops_per_step']['total'])} "
                             f"(tower {_flops(figures['model_flops_per_step']['tower'])}, "
                             f"LM {_flops(figures['model_flops_per_step']['lm'])})"],
        ["achieved", f"{_flops(figures['achieved_tflops'] * 1e12)}/s"],
        ["MFU", "n/a (unknown peak; pass --peak-tflops)" if figures["mfu"] is None
         else f"{100 * figures['mfu']:.1f} % of {s['peak_bf16_tflops']} TFLOP/s"],
    ]
    for label in ("without_checkpointing", "with_checkpointing"):
        if label in figures:
            o = figures[label]
            text = f"{o['step_seconds_median']:.3f} s/step"
            if o["peak_memory_gib"] is not None:
                text += f", peak {o['peak_memory_gib']:.2f} GiB"
            rows.append([label.replace("_", " "), text])
    if "memory_ratio_checkpointing_on_over_off" in figures:
        rows.append(["checkpointing on/off", f"memory {figures['memory_ratio_checkpointing_on_over_off']:.2f}x, "
                                             f"time {figures['time_ratio_checkpointing_on_over_off']:.2f}x"])
    return table(["setting", "value"], rows, title="GPU check: one training step")


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


def main(argv=None) -> dict:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", choices=("small", "tiny"), default="small")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--compare-no-checkpointing", action="store_true",
                        help="also run the batch with checkpointing toggled (memory/time ratio)")
    parser.add_argument("--long-side", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--max-image-tokens", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    args = parser.parse_args(argv)
    if args.quick:  # tests the script on a CPU: tiny preset, small image, two steps
        args.preset, args.long_side, args.batch_size, args.text_tokens = "tiny", 256, 2, 32
        args.max_image_tokens, args.warmup, args.steps = 64, 1, 1
    figures = run(args.preset, args.device, args.bf16, args.checkpointing, args.compare_no_checkpointing,
                  args.long_side, args.batch_size, args.text_tokens, args.max_image_tokens, args.warmup, args.steps,
                  args.peak_tflops)
    print(report(figures))
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
