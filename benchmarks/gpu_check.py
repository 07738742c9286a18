"""One short GPU check of a training step: step time, tokens/s, peak memory and model-FLOPs utilisation (MFU).

    python benchmarks/gpu_check.py --device cuda --preset small --bf16 --checkpointing --long-side 2048 --json PATH

`bash benchmarks/gpu_check.sh` runs it on a GPU machine; `--device cpu --quick` only tests the script.
See docs/performance.md#gpu.
"""

from __future__ import annotations

import time

from _common import benchmark_main, image_batch, median, table, train_step

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
    "GH200": 989.4, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}
OPTIONS = dict(device="cuda", preset="small", bf16=False, checkpointing=False, compare_no_checkpointing=False,
               long_side=2048, batch_size=8, text_tokens=256, max_image_tokens=1024, warmup=3, steps=10,
               peak_tflops=0.0)
QUICK = dict(preset="tiny", long_side=256, batch_size=2, text_tokens=32, max_image_tokens=64, warmup=1, steps=1)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # insertion order: the most specific names first
        if key in device_name:
            return value
    return None


def _matmul_weights(module) -> int:
    from torch import nn

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def model_flops(model, plans, rows: int, seq_len: int) -> dict:
    """Model FLOPs of one training step (forward + backward), split by part: 6 x matmul weights x tokens, plus
    12 x layers x sequence^2 x hidden for attention (per image in the tower, per row in the LM)."""
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
        train_step(model, optimizer, batch, autocast)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(steps):
        start = time.perf_counter()
        loss = train_step(model, optimizer, batch, autocast)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del optimizer
    if cuda:
        torch.cuda.empty_cache()
    return {"step_seconds_median": median(times), "step_seconds_all": times, "peak_memory_gib": peak, "loss": loss}


def run(args) -> dict:
    import torch

    from modeling_nanovlm import NanoVLMForConditionalGeneration, small_config, tiny_config
    from processing import NanoVLMImageProcessor

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = {"small": small_config, "tiny": tiny_config}[args.preset]()
    model = NanoVLMForConditionalGeneration(config).to(device)
    model.config.text_config.use_cache = False
    processor = NanoVLMImageProcessor(max_image_tokens=args.max_image_tokens, max_image_size=max(2048, args.long_side))
    image_hw = (args.long_side * 3 // 4, args.long_side)
    batch, plan = image_batch(processor, *image_hw, config.image_token_id, device, args.text_tokens, args.batch_size)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    seq_len = plan.num_tokens + args.text_tokens
    flops = model_flops(model, [plan] * args.batch_size, args.batch_size, seq_len)

    main = measure(model, batch, device, args.bf16, args.checkpointing, args.warmup, args.steps)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or (peak_tflops(gpu) if gpu else None)
    seconds = main["step_seconds_median"]
    achieved = flops["total"] / seconds / 1e12
    figures = {
        "benchmark": "gpu_check",
        "settings": {"preset": args.preset, "parameters": sum(p.numel() for p in model.parameters()),
                     "device": args.device, "gpu": gpu, "bf16": args.bf16, "checkpointing": args.checkpointing,
                     "batch_size": args.batch_size, "image_hw": list(image_hw),
                     "tower_patches_per_image": plan.num_patches, "image_tokens_per_image": plan.num_tokens,
                     "shuffle_factor": plan.shuffle_factor, "text_tokens": args.text_tokens,
                     "sequence_length": seq_len, "max_image_tokens": args.max_image_tokens, "warmup": args.warmup,
                     "steps": args.steps, "peak_bf16_tflops": peak},
        "step_seconds": seconds,
        "step_seconds_all": main["step_seconds_all"],
        "samples_per_second": args.batch_size / seconds,
        "lm_tokens_per_second": args.batch_size * seq_len / seconds,
        "tower_patches_per_second": args.batch_size * plan.num_patches / seconds,
        "peak_memory_gib": main["peak_memory_gib"],
        "model_flops_per_step": flops,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "loss": main["loss"],
    }
    if args.compare_no_checkpointing:  # the same batch with checkpointing toggled
        other = measure(model, batch, device, args.bf16, not args.checkpointing, args.warmup, max(1, args.steps // 2))
        figures["without_checkpointing" if args.checkpointing else "with_checkpointing"] = other
        if main["peak_memory_gib"] and other["peak_memory_gib"]:
            on, off = (main, other) if args.checkpointing else (other, main)
            figures["memory_ratio_checkpointing_on_over_off"] = on["peak_memory_gib"] / off["peak_memory_gib"]
            figures["time_ratio_checkpointing_on_over_off"] = on["step_seconds_median"] / off["step_seconds_median"]
    return figures


def report(figures: dict) -> str:
    s, flops, mem = figures["settings"], figures["model_flops_per_step"], figures["peak_memory_gib"]
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
        ["model FLOPs/step", f"{_flops(flops['total'])} (tower {_flops(flops['tower'])}, LM {_flops(flops['lm'])})"],
        ["achieved", f"{_flops(figures['achieved_tflops'] * 1e12)}/s"],
        ["MFU", "n/a (unknown peak; pass --peak-tflops)" if figures["mfu"] is None
         else f"{100 * figures['mfu']:.1f} % of {s['peak_bf16_tflops']} TFLOP/s"],
    ]
    for label in ("without_checkpointing", "with_checkpointing"):
        if label in figures:
            other = figures[label]
            text = f"{other['step_seconds_median']:.3f} s/step"
            if other["peak_memory_gib"] is not None:
                text += f", peak {other['peak_memory_gib']:.2f} GiB"
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
    return benchmark_main(argv, __doc__, OPTIONS, QUICK, run, report)


if __name__ == "__main__":
    main()
