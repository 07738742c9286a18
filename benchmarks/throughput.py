"""Training throughput: nanoVLM's bucketing sampler vs random batching vs padding images to the batch's largest;
and the input pipeline: DataLoader workers, uint8 pixel transport, and where a training step's time goes.

    python benchmarks/throughput.py [--samples 1600] [--window 4] [--pad-batches 16] [--json PATH]
    python benchmarks/throughput.py --sections pipeline,breakdown [--breakdown-plot PATH]

See docs/performance.md#training-throughput and docs/performance.md#input-pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections import deque

import numpy as np

from _common import (
    SNAP_ASPECT_RATIOS,
    encoded_photos,
    finish,
    load_average,
    log_midpoints,
    median,
    parse_args,
    pct,
    pyplot,
    rotated,
    save_figure,
    set_torch_threads,
    table,
    tiny_model,
    training_mix,
    upstream_nanovlm_tokens,
)
from processing import NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor, load_image

WORDS = ("the a digit cat cup page chart shows value of in on at left right top bottom red blue green small large "
         "line bar axis title text number year total price man woman car tree sky dog house road sign window "
         "table plot figure image photo screen button menu icon").split()
SNAP_SIZES = (32, 64, 96, 128, 192, 256, 384, 512)
PIPELINE_SIZES = ((640, 480), (1024, 768), (1600, 1200))
SECTIONS = ("strategies", "pipeline", "breakdown")
OPTIONS = dict(sections=",".join(SECTIONS), samples=1600, window=4, pad_batches=16, batch_size=16, threads=1,
               image_scale=0.125, text_scale=0.25, max_image_tokens=64, max_image_size=256, lr=1e-3,
               strategies="ours,random,pad-to-max", turn_batches=8, turns=8, breakdown_batches=12, breakdown_plot="")
QUICK = dict(samples=32, window=2, pad_batches=2, batch_size=8, turn_batches=2, turns=1, breakdown_batches=2)


def bench_tokenizer():
    """The offline ChatML tokenizer every section uses, trained on the benchmark's words."""
    from offline_tokenizer import build_tokenizer

    return build_tokenizer([" ".join(WORDS)] * 20 + ["Which digit is shown and where?"])


def tokens_per_word(tokenizer) -> float:
    sample = " ".join(WORDS * 4)
    return len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / (len(WORDS) * 4)


def random_words(rng: np.random.Generator, token_lengths, tokens_per_word: float, end: str = "") -> list[str]:
    """Texts of random WORDS, one per length, each about that many tokens long."""
    return [" ".join(rng.choice(WORDS, max(1, round(n / tokens_per_word)))) + end for n in token_lengths]


def make_processor(tokenizer, args, **settings):
    """A NanoVLMProcessor at the run's budget (`--max-image-tokens`, `--max-image-size`)."""
    return NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=args.max_image_tokens,
                                                  max_image_size=args.max_image_size, **settings), tokenizer)


def training_arguments(output_dir: str, args, workers: int = 0, **extra):
    """The TrainingArguments every benchmark Trainer shares: CPU, no saving or reporting, gradient clipping at 1."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, learning_rate=args.lr, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", seed=args.seed, dataloader_num_workers=workers,
        max_grad_norm=1.0, **extra,
    )


def trainer_step(trainer, model, batch) -> float:
    """The Trainer's step (forward, loss over the batch's answer tokens, backward), clipping and the optimizer step."""
    loss = trainer.training_step(model, batch, num_items_in_batch=int((batch["labels"] != -100).sum()))
    trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    model.zero_grad(set_to_none=True)
    return float(loss)


# Batching strategies


class SyntheticRows:
    """Rows {"image": PIL image, "prompt", "answer", "useful_tokens"} of the training mix, images made on access."""

    def __init__(self, mix: dict, tokens_per_word: float, seed: int):
        self.sizes = mix["image_sizes"]
        rng = np.random.default_rng(seed + 1)
        self.prompts = random_words(rng, mix["question_lengths"], tokens_per_word, end="?")
        self.answers = random_words(rng, mix["answer_lengths"], tokens_per_word)
        self.useful_tokens = None  # filled in once the processor is known

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, index):
        from PIL import Image

        height, width = self.sizes[index]
        color = ((37 * index) % 256, (91 * index) % 256, (53 * index) % 256)
        row = {"image": Image.new("RGB", (width, height), color), "prompt": self.prompts[index],
               "answer": self.answers[index]}
        if self.useful_tokens is not None:
            row["useful_tokens"] = self.useful_tokens[index]
        return row


class BenchCollator(NanoVLMCollator):
    """NanoVLMCollator that logs (rows, useful tokens) of every batch in order (FIFO). With `pad_to_max`, every image
    of a batch is resized to its own plan and pasted (top-left) on a canvas of the batch's largest planned size."""

    def __init__(self, processor, log: deque, pad_to_max: bool = False):
        super().__init__(processor)
        self.log, self.pad_to_max = log, pad_to_max

    def __call__(self, rows):
        self.log.append((len(rows), sum(int(row["useful_tokens"]) for row in rows)))
        return super().__call__(self.padded(rows) if self.pad_to_max else rows)

    def padded(self, rows):
        from PIL import Image

        ip = self.processor.image_processor
        images = [load_image(row["image"]) for row in rows]
        plans = [ip.plan(image.height, image.width, **self.plan_overrides) for image in images]
        height = max(plan.resized_height for plan in plans)
        width = max(plan.resized_width for plan in plans)
        padded = []
        for row, image, plan in zip(rows, images, plans):
            canvas = Image.new("RGB", (width, height), tuple(ip.background_color))
            canvas.paste(image.resize((plan.resized_width, plan.resized_height)), (0, 0))
            padded.append({**row, "image": canvas})
        return padded


def image_token_comparison(args, small_mix: dict) -> dict:
    """Mean image tokens per image: nanoVLM's plan vs upstream nanoVLM's tiles, on this run's and the full mix."""
    full = training_mix(1000 if args.quick else 20000, seed=args.seed)["image_sizes"]
    cases = {
        "throughput_mix": (small_mix["image_sizes"], args.max_image_tokens, args.max_image_size),
        "full_mix_budget_1024": (full, 1024, 2048),
        "full_mix_budget_256": (full, 256, 2048),
    }
    out = {}
    for name, (sizes, budget, max_size) in cases.items():
        ip = NanoVLMImageProcessor(max_image_tokens=budget, max_image_size=max_size)
        ours = np.mean([ip.num_image_tokens(h, w) for h, w in sizes])
        up_2048 = np.mean([upstream_nanovlm_tokens(h, w, resize_to_max_side=True) for h, w in sizes])
        up_cap = np.mean([upstream_nanovlm_tokens(h, w, resize_to_max_side=False) for h, w in sizes])
        out[name] = {
            "images": len(sizes),
            "nanovlm_settings": {"max_image_tokens": budget, "max_image_size": max_size},
            "ours_tokens_per_image": float(ours),
            "upstream_resize_to_2048_tokens_per_image": float(up_2048),
            "upstream_cap_2048_tokens_per_image": float(up_cap),
            "ratio_upstream_2048_over_ours": float(up_2048 / ours),
            "ratio_upstream_cap_over_ours": float(up_cap / ours),
        }
    return out


def build_strategy(name, rows, processors, text_lengths, base, args, output_dir) -> dict:
    """A Trainer with its own copy of the initial model and its own train dataloader."""
    from transformers import Trainer

    from modeling_nanovlm import NanoVLMTrainer
    from processing import BucketBatchSampler

    log, model = deque(), copy.deepcopy(base)
    train_args = training_arguments(output_dir, args, remove_unused_columns=False)
    if name in ("ours", "ours+snap"):
        # built from the known sizes and text lengths, as BucketBatchSampler.from_dataset would (without reading
        # every row again)
        proc = processors[name]
        buckets = dict(size_buckets=log_midpoints(SNAP_SIZES),
                       aspect_ratio_edges=log_midpoints(SNAP_ASPECT_RATIOS)) if name == "ours+snap" else {}
        sampler = BucketBatchSampler(rows.sizes, text_lengths, proc.image_processor, batch_size=args.batch_size,
                                     seed=args.seed, **buckets)
        trainer = NanoVLMTrainer(model=model, args=train_args, train_dataset=rows, processing_class=proc,
                                 data_collator=BenchCollator(proc, log), batch_sampler=sampler)
    elif name in ("random", "pad-to-max"):
        collator = BenchCollator(processors["ours"], log, pad_to_max=name == "pad-to-max")
        trainer = Trainer(model=model, args=train_args, train_dataset=rows, data_collator=collator)
    else:
        raise ValueError(f"unknown strategy {name!r}")
    trainer.create_optimizer()
    return {"trainer": trainer, "model": model, "log": log, "loader": trainer.get_train_dataloader(),
            "iterator": None}


def warm_up(strategy: dict) -> None:
    """One uncounted step (no optimizer step) on a batch from a second, throw-away iterator of the dataloader."""
    warm_iterator = iter(strategy["trainer"].get_train_dataloader())
    batch = next(warm_iterator)
    strategy["trainer"].training_step(strategy["model"], batch,
                                      num_items_in_batch=int((batch["labels"] != -100).sum()))
    strategy["model"].zero_grad(set_to_none=True)
    del warm_iterator
    strategy["log"].clear()


def train_window(strategy, steps: int) -> dict:
    """Up to `steps` training steps (data loading included): seconds, samples, useful tokens, tower calls, padding."""
    if strategy["iterator"] is None:
        strategy["iterator"] = iter(strategy["loader"])
    done = samples = useful = lm_positions = tower_calls = patches = 0
    loss_sum = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(strategy["iterator"], None)
        if batch is None:
            strategy["finished"] = True
            break
        rows, useful_tokens = strategy["log"].popleft()
        loss_sum += trainer_step(strategy["trainer"], strategy["model"], batch)
        done += 1
        samples += rows
        useful += useful_tokens
        lm_positions += batch["input_ids"].numel()
        grids = batch["image_grid_hw"]
        tower_calls += len({tuple(g) for g in grids.tolist()})
        patches += int(grids.prod(-1).sum())
    return {"seconds": time.perf_counter() - start, "steps": done, "samples": samples, "useful_tokens": useful,
            "lm_positions": lm_positions, "tower_calls": tower_calls, "tower_patches": patches, "loss_sum": loss_sum}


def alternate_windows(strategies: dict, window: int, pad_batches: int) -> dict[str, list[dict]]:
    """Train every strategy to the end of its epoch (pad-to-max: `pad_batches` batches), `window` batches a turn,
    the strategy that goes first rotating each round. Returns each strategy's windows (`train_window` results)."""
    windows = {name: [] for name in strategies}

    def left(name):  # batches pad-to-max still has to train
        return pad_batches - sum(w["steps"] for w in windows[name])

    round_index = 0
    while True:
        active = [n for n in strategies
                  if not strategies[n].get("finished") and not (n == "pad-to-max" and left(n) <= 0)]
        if not active:
            return windows
        for name in rotated(active, round_index):
            result = train_window(strategies[name], min(window, left(name)) if name == "pad-to-max" else window)
            if result["steps"]:
                windows[name].append(result)
        round_index += 1


def strategy_figures(windows: list[dict], num_samples: int, padded_images: bool) -> dict:
    """A strategy's figures summed over its windows. With `padded_images` (pad-to-max) it may not have trained the
    whole epoch, and LM padding is left out: its LM positions hold the canvases' tokens, not the samples' own."""
    total = {key: sum(w[key] for w in windows) for key in windows[0]}
    seconds, steps, samples = total["seconds"], total["steps"], total["samples"]
    return {
        "windows": len(windows),
        "batches": steps,
        "samples": samples,
        "whole_epoch": not padded_images or samples >= num_samples,
        "seconds": seconds,
        "samples_per_second": samples / seconds,
        "useful_tokens_per_second": total["useful_tokens"] / seconds,
        "seconds_per_batch": seconds / steps,
        "lm_padding": None if padded_images else 1 - total["useful_tokens"] / total["lm_positions"],
        "lm_positions_per_sample": total["lm_positions"] / samples,
        "tower_calls_per_batch": total["tower_calls"] / steps,
        "tower_patches_per_sample": total["tower_patches"] / samples,
        "mean_loss": total["loss_sum"] / steps,
    }


def run_strategies(args) -> dict:
    """One epoch per batching strategy, strategies taking turns every `--window` batches: samples/s, tokens/s."""
    set_torch_threads(args.threads)
    names = [name.strip() for name in args.strategies.split(",") if name.strip()]
    mix = training_mix(args.samples, seed=args.seed, image_scale=args.image_scale, text_scale=args.text_scale)
    tokenizer = bench_tokenizer()
    processors = {"ours": make_processor(tokenizer, args),
                  "ours+snap": make_processor(tokenizer, args, snap_sizes=list(SNAP_SIZES),
                                         snap_aspect_ratios=list(SNAP_ASPECT_RATIOS))}
    rows = SyntheticRows(mix, tokens_per_word(tokenizer), args.seed)
    collator = NanoVLMCollator(processors["ours"])
    text_lengths = [collator.text_length({"prompt": p, "answer": a}) for p, a in zip(rows.prompts, rows.answers)]
    image_tokens = [processors["ours"].image_processor.num_image_tokens(h, w) for h, w in mix["image_sizes"]]
    rows.useful_tokens = [t + i for t, i in zip(text_lengths, image_tokens)]
    base = tiny_model(tokenizer, processors["ours"].image_token_id, args.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        strategies = {name: build_strategy(name, rows, processors, text_lengths, base, args, output_dir)
                      for name in names}
        for strategy in strategies.values():
            warm_up(strategy)
        windows = alternate_windows(strategies, args.window, args.pad_batches)
    results = {name: strategy_figures(windows[name], args.samples, padded_images=name == "pad-to-max")
               for name in names}
    ratios = {}
    for a, b in (("ours", "random"), ("ours", "pad-to-max"), ("ours+snap", "random"), ("ours+snap", "ours")):
        if a in results and b in results:
            ratios[f"{a}_vs_{b}"] = {key: results[a][key] / results[b][key]
                                     for key in ("samples_per_second", "useful_tokens_per_second")}
    return {
        "settings": {
            "samples": args.samples, "window_steps": args.window, "pad_to_max_batches": args.pad_batches,
            "batch_size": args.batch_size, "seed": args.seed, "torch_threads": args.threads,
            "image_scale": args.image_scale, "text_scale": args.text_scale,
            "max_image_tokens": args.max_image_tokens, "max_image_size": args.max_image_size,
            "model": "tiny_config (~1M parameters, random weights), fp32",
            "training_loop": "each strategy's Trainer dataloader (one epoch) + Trainer.training_step + clip + AdamW "
                             "step, strategies alternating every window_steps batches",
            "mean_text_tokens": float(np.mean(text_lengths)), "mean_image_tokens": float(np.mean(image_tokens)),
            "snap_sizes": list(SNAP_SIZES), "snap_aspect_ratios": [round(r, 4) for r in SNAP_ASPECT_RATIOS],
        },
        "goal": {"ours_vs_random_samples_per_second_min": 2.0},
        "strategies": results,
        "ratios": ratios,
        "image_tokens_vs_upstream": image_token_comparison(args, mix),
    }


def strategies_report(figures: dict) -> str:
    s = figures["settings"]
    rows = [[name, f["batches"], round(f["samples_per_second"], 1), round(f["useful_tokens_per_second"]),
             round(f["seconds_per_batch"], 3), pct(f["lm_padding"]), round(f["lm_positions_per_sample"]),
             round(f["tower_calls_per_batch"], 2), round(f["tower_patches_per_sample"])]
            for name, f in figures["strategies"].items()]
    out = [table(["strategy", "batches", "samples/s", "tokens/s", "s/batch", "LM pad", "LM positions/sample",
                  "tower calls/batch", "tower patches/sample"], rows,
                 title=f"Training throughput: tiny model, batch {s['batch_size']}, one epoch of {s['samples']} "
                       f"samples per strategy (pad-to-max: its first {s['pad_to_max_batches']} batches), alternating "
                       f"every {s['window_steps']} batches; {s['torch_threads']} thread(s); "
                       f"images x{s['image_scale']}, text x{s['text_scale']}, "
                       f"max_image_tokens={s['max_image_tokens']}, max_image_size={s['max_image_size']}")]
    out.append("tokens/s: useful LM tokens (text + the sample's own image tokens), the same per sample everywhere.")
    for key, r in figures["ratios"].items():
        out.append(f"{key}: {r['samples_per_second']:.2f}x samples/s, {r['useful_tokens_per_second']:.2f}x tokens/s")
    goal = figures["goal"]["ours_vs_random_samples_per_second_min"]
    if "ours_vs_random" in figures["ratios"]:
        ratio = figures["ratios"]["ours_vs_random"]["samples_per_second"]
        out.append(f"goal ours/random >= {goal}x: {'met' if ratio >= goal else 'MISSED'} ({ratio:.2f}x)")
    rows = [[name, c["images"], "{max_image_tokens}/{max_image_size}".format(**c["nanovlm_settings"]),
             round(c["ours_tokens_per_image"]), round(c["upstream_resize_to_2048_tokens_per_image"]),
             round(c["ratio_upstream_2048_over_ours"], 2), round(c["upstream_cap_2048_tokens_per_image"]),
             round(c["ratio_upstream_cap_over_ours"], 2)]
            for name, c in figures["image_tokens_vs_upstream"].items()]
    out.append("")
    out.append(table(["image mix", "images", "budget/max size", "ours tok/img", "upstream (resize to 2048)",
                      "x ours", "upstream (cap 2048)", "x ours"], rows,
                     title="Image tokens per image: nanoVLM's plan vs upstream nanoVLM (512-px tiles + global view, "
                           "64 tokens each)"))
    return "\n".join(out)


# The input pipeline: workers, uint8 transport, and where a step's time goes


class PhotoRows:
    """Rows {"image": JPEG bytes, "prompt", "answer"}: the benchmark photos, cycled, with the mix's text lengths."""

    def __init__(self, num_samples: int, tokens_per_word: float, seed: int, quick: bool):
        self.photo_sizes = PIPELINE_SIZES[:2] if quick else PIPELINE_SIZES
        photos = encoded_photos(2 if quick else None, self.photo_sizes)
        rng = np.random.default_rng(seed)
        order = rng.permutation(num_samples) % len(photos)
        self.images = [photos[i]["bytes"] for i in order]
        self.sizes = [(photos[i]["height"], photos[i]["width"]) for i in order]
        mix = training_mix(num_samples, seed=seed, text_scale=0.25)
        self.prompts = random_words(rng, mix["question_lengths"], tokens_per_word, end="?")
        self.answers = random_words(rng, mix["answer_lengths"], tokens_per_word)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "prompt": self.prompts[index], "answer": self.answers[index]}

    def text_lengths(self, processor) -> list[int]:
        collator = NanoVLMCollator(processor)
        return [collator.text_length(self[i]) for i in range(len(self))]


def pipeline_trainer(model, rows, processor, text_lengths, args, workers, output_dir):
    from modeling_nanovlm import NanoVLMTrainer
    from processing import BucketBatchSampler

    sampler = BucketBatchSampler(rows.sizes, text_lengths, processor.image_processor, batch_size=args.batch_size,
                                 seed=args.seed)
    trainer = NanoVLMTrainer(model=model, args=training_arguments(output_dir, args, workers), train_dataset=rows,
                             processing_class=processor, batch_sampler=sampler, auto_workers=False)
    trainer.create_optimizer()
    return trainer


def run_pipeline(args, workers_list=(0, 2), dtypes=("float32", "uint8")) -> dict:
    """samples/s for every (workers, pixel dtype): fresh iterator per turn, `--turn-batches` batches, turns rotating."""
    set_torch_threads(args.threads)
    tokenizer = bench_tokenizer()
    rows = PhotoRows(args.turn_batches * args.batch_size, tokens_per_word(tokenizer), args.seed, args.quick)
    processors = {dtype: make_processor(tokenizer, args, pixel_dtype=dtype) for dtype in dtypes}
    text_lengths = rows.text_lengths(processors[dtypes[0]])
    base = tiny_model(tokenizer, processors[dtypes[0]].image_token_id, args.seed)
    configs = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for workers in workers_list:
            for dtype in dtypes:
                model = copy.deepcopy(base)
                trainer = pipeline_trainer(model, rows, processors[dtype], text_lengths, args, workers, output_dir)
                configs[f"{workers} workers, {dtype}"] = {"trainer": trainer, "model": model, "workers": workers,
                                                           "pixel_dtype": dtype, "seconds": 0.0, "samples": 0,
                                                           "batches": 0, "pixel_bytes": 0, "turn_seconds": []}
        names = list(configs)
        for c in configs.values():  # warm-up, not counted: first-call costs (allocator, lazy inits)
            for batch, _ in zip(c["trainer"].get_train_dataloader(), range(2)):
                trainer_step(c["trainer"], c["model"], batch)
        for turn in range(args.turns):
            for name in rotated(names, turn):
                pipeline_turn(configs[name], args.turn_batches)
    return {"configs": pipeline_figures(configs, args.turn_batches), "reference": names[0],
            "settings": {"samples": len(rows), "turn_batches": args.turn_batches, "turns": args.turns,
                         "batch_size": args.batch_size, "torch_threads": args.threads,
                         "max_image_tokens": args.max_image_tokens, "max_image_size": args.max_image_size,
                         "photos": ", ".join(f"{w}x{h}" for w, h in rows.photo_sizes), "cpus": os.cpu_count(),
                         "load_average": load_average()}}


def pipeline_turn(config: dict, turn_batches: int) -> None:
    """`turn_batches` training steps from a fresh dataloader iterator, added to the configuration's counts."""
    start = time.perf_counter()
    iterator = iter(config["trainer"].get_train_dataloader())
    for _ in range(turn_batches):
        batch = next(iterator, None)
        if batch is None:
            break
        trainer_step(config["trainer"], config["model"], batch)
        config["samples"] += len(batch["input_ids"])
        config["batches"] += 1
        config["pixel_bytes"] += batch["pixel_values"].nbytes
    del iterator  # shuts its workers down; counted, as an epoch's start-up is
    seconds = time.perf_counter() - start
    config["seconds"] += seconds
    config["turn_seconds"].append(seconds)


def pipeline_figures(configs: dict, turn_batches: int) -> dict:
    """samples/s per configuration, over all turns and for the median turn, and relative to the first one."""
    results = {}
    for name, c in configs.items():
        results[name] = {
            "workers": c["workers"], "pixel_dtype": c["pixel_dtype"], "batches": c["batches"], "samples": c["samples"],
            "seconds": c["seconds"], "samples_per_second": c["samples"] / c["seconds"],
            # the median turn resists the load spikes of a shared machine better than the total
            "median_turn_samples_per_second": c["samples"] / c["batches"] * turn_batches / median(c["turn_seconds"]),
            "pixel_mb_per_batch": c["pixel_bytes"] / c["batches"] / 2**20,
            "turn_seconds": [round(s, 3) for s in c["turn_seconds"]],
        }
    reference = next(iter(results.values()))
    for r in results.values():
        r["vs_first"] = r["samples_per_second"] / reference["samples_per_second"]
        r["median_vs_first"] = r["median_turn_samples_per_second"] / reference["median_turn_samples_per_second"]
    return results


@contextlib.contextmanager
def timer(totals: dict, key: str):
    """Adds the seconds spent in the block to `totals[key]`."""
    start = time.perf_counter()
    yield
    totals[key] = totals.get(key, 0.0) + time.perf_counter() - start


def timed_image_processor(totals: dict, **settings):
    """A NanoVLMImageProcessor that adds its decode time and its whole time to `totals`."""

    class TimedImageProcessor(NanoVLMImageProcessor):
        def _opened(self, raw):  # decodes images whose format cannot be decoded at reduced scale
            with timer(totals, "decode"):
                return super()._opened(raw)

        def _decoded(self, opened, plan):
            with timer(totals, "decode"):
                return super()._decoded(opened, plan)

        def preprocess(self, images, return_tensors=None, **overrides):
            with timer(totals, "image_processor"):
                return super().preprocess(images, return_tensors=return_tensors, **overrides)

    return TimedImageProcessor(**settings)


def run_breakdown(args, dtypes=("float32", "uint8")) -> dict:
    """Seconds per sample of each part of a training step, in the training process, for each pixel dtype."""
    set_torch_threads(args.threads)
    tokenizer = bench_tokenizer()
    rows = PhotoRows((args.breakdown_batches + 1) * args.batch_size, tokens_per_word(tokenizer), args.seed,
                     args.quick)
    with tempfile.TemporaryDirectory() as output_dir:
        out = {dtype: breakdown_one_dtype(dtype, rows, tokenizer, args, output_dir) for dtype in dtypes}
    return {"by_pixel_dtype": out,
            "settings": {"batches": args.breakdown_batches + 1, "batch_size": args.batch_size,
                         "torch_threads": args.threads, "max_image_tokens": args.max_image_tokens,
                         "max_image_size": args.max_image_size, "model": "tiny_config, fp32, CPU",
                         "load_average": load_average(),
                         "note": "the tower is timed on its own (forward + backward of its features); LM + connector "
                                 "is the full step's forward + backward minus that"}}


def breakdown_one_dtype(dtype, rows, tokenizer, args, output_dir) -> dict:
    """One epoch of `rows` (the first batch a warm-up), each part of every step timed: ms per sample and share."""
    totals = {}
    ip = timed_image_processor(totals, max_image_tokens=args.max_image_tokens, max_image_size=args.max_image_size,
                               pixel_dtype=dtype)
    proc = NanoVLMProcessor(ip, tokenizer)
    collator = NanoVLMCollator(proc)
    model = tiny_model(tokenizer, proc.image_token_id, args.seed)
    trainer = pipeline_trainer(model, rows, proc, rows.text_lengths(proc), args, 0, output_dir)
    samples = 0
    for index, indices in enumerate(trainer.train_batch_sampler):
        if index == 0:  # warm-up batch, not counted
            trainer_step(trainer, model, trainer._prepare_inputs(collator([rows[i] for i in indices])))
            totals.clear()
            continue
        timed_step(trainer, model, collator, [rows[i] for i in indices], totals)
        samples += len(indices)
    parts = {
        "decode": totals["decode"],
        "resize + patchify + normalise": totals["image_processor"] - totals["decode"],
        "collate (text, labels)": totals["collate_total"] - totals["image_processor"],
        "vision tower (fwd + bwd)": totals["tower"],
        "LM + connector (fwd + bwd)": max(0.0, totals["step_forward_backward"] - totals["tower"]),
        "optimizer": totals["optimizer"],
    }
    total = sum(parts.values())
    return {
        "samples": samples,
        "ms_per_sample": {k: 1000 * v / samples for k, v in parts.items()},
        "share": {k: v / total for k, v in parts.items()},
        "total_ms_per_sample": 1000 * total / samples,
    }


def timed_step(trainer, model, collator, rows: list[dict], totals: dict) -> None:
    """Collate `rows` and train on them, adding the seconds of each part to `totals`. The tower runs once more on its
    own (forward + backward of its features, gradients dropped) to time it apart from the rest of the step."""
    with timer(totals, "collate_total"):
        batch = collator(rows)
    batch = trainer._prepare_inputs(batch)
    with timer(totals, "tower"):
        features = model.get_image_features(batch["pixel_values"], batch["image_grid_hw"],
                                            batch["image_token_hw"], batch["image_shuffle_factor"])
        features.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    with timer(totals, "step_forward_backward"):
        trainer.training_step(model, batch, num_items_in_batch=int((batch["labels"] != -100).sum()))
    with timer(totals, "optimizer"):
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)


def plot_breakdown(breakdown: dict, path: str) -> None:
    """A stacked bar per pixel dtype: ms per sample of each part of a step."""
    plt = pyplot()
    by_dtype = breakdown["by_pixel_dtype"]
    parts = list(next(iter(by_dtype.values()))["ms_per_sample"])
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(by_dtype)))
    for row, figures in enumerate(by_dtype.values()):
        left = 0.0
        for index, part in enumerate(parts):
            value = figures["ms_per_sample"][part]
            ax.barh(row, value, left=left, color=f"C{index}", label=part if row == 0 else None)
            left += value
    ax.set_yticks(range(len(by_dtype)), [f"pixels {d}" for d in by_dtype])
    ax.set_xlabel("ms per training sample (tiny model, CPU, 0 workers)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, fontsize=8)
    save_figure(fig, path, dpi=100, bbox_inches="tight")


def pipeline_report(pipeline: dict) -> str:
    s = pipeline["settings"]
    rows = [[name, c["batches"], round(c["samples_per_second"], 1), f"{c['vs_first']:.2f}x",
             round(c["median_turn_samples_per_second"], 1), f"{c['median_vs_first']:.2f}x",
             f"{min(c['turn_seconds']):.1f}-{max(c['turn_seconds']):.1f}", round(c["pixel_mb_per_batch"], 2)]
            for name, c in pipeline["configs"].items()]
    return table(["configuration", "batches", "samples/s", f"x {pipeline['reference']}", "samples/s (median turn)",
                  "x (median)", "turn seconds", "pixel MB/batch"], rows,
                 title=f"Input pipeline: tiny model, batch {s['batch_size']}, JPEG photos {s['photos']}, budget "
                       f"{s['max_image_tokens']}/{s['max_image_size']} px, {s['turns']} turns of {s['turn_batches']} "
                       f"batches per configuration (fresh iterator each), {s['torch_threads']} torch thread(s), "
                       f"{s['cpus']} CPUs, load {s['load_average']}")


def breakdown_report(breakdown: dict) -> str:
    by_dtype, s = breakdown["by_pixel_dtype"], breakdown["settings"]
    rows = []
    for part in next(iter(by_dtype.values()))["ms_per_sample"]:
        row = [part]
        for d in by_dtype.values():
            row += [round(d["ms_per_sample"][part], 2), f"{100 * d['share'][part]:.1f} %"]
        rows.append(row)
    rows.append(["total"] + [x for d in by_dtype.values() for x in (round(d["total_ms_per_sample"], 2), "100 %")])
    headers = ["part"] + [h for dtype in by_dtype for h in (f"{dtype} ms/sample", f"{dtype} share")]
    return table(headers, rows, title=f"Where a training step's time goes (0 workers, in the training "
                                      f"process; {s['batches']} batches of {s['batch_size']}, load "
                                      f"{s['load_average']})")


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, OPTIONS, QUICK)
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    if sections - set(SECTIONS):
        raise SystemExit(f"unknown section(s) {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    figures, printed = {"benchmark": "throughput"}, []
    if "strategies" in sections:
        figures.update(run_strategies(args))
        printed.append(strategies_report(figures))
    if "pipeline" in sections:
        figures["pipeline"] = run_pipeline(args)
        printed.append(pipeline_report(figures["pipeline"]))
    if "breakdown" in sections:
        figures["breakdown"] = run_breakdown(args)
        printed.append(breakdown_report(figures["breakdown"]))
        if args.breakdown_plot:
            plot_breakdown(figures["breakdown"], args.breakdown_plot)
    return finish(args, figures, "\n\n".join(printed))


if __name__ == "__main__":
    main()
