"""Training throughput: nanoVLM's bucketing sampler vs random batching vs padding images to the batch's largest.

Same tiny model (same initial weights, one copy per strategy), same rows, same run. Every strategy trains exactly
one epoch of the same rows (the `padding.py` mix, images and text shrunk so a CPU step is short), the strategies
taking turns every few batches so that load changes on a shared machine hit all of them alike; one warm-up step
each is not counted. pad-to-max, which is slow, trains only its first batches: its batches are random, so a few of
them cost per sample what its epoch would. Each step is the Trainer's own data path and step:

  ours        `NanoVLMTrainer.get_train_dataloader()` (BucketBatchSampler, passed as `batch_sampler=` because it is
              built from the known sizes and lengths, + NanoVLMCollator, prepared by accelerate)
  ours+snap   the same with the image processor snapping images to one shape per bucket (sampler buckets to match)
  random      the stock `transformers.Trainer` dataloader (RandomSampler, batch 16) with the same NanoVLMCollator:
              images keep their shapes, the tower runs once per distinct shape
  pad-to-max  the same random batches, every image pasted on a canvas of the batch's largest planned size (what a
              fixed-shape VLM must do): one tower call per batch over padded pixels

then `Trainer.training_step` (forward, loss normalised by the batch's answer tokens, backward), gradient clipping
and an AdamW step. `trainer.train()` itself is not used because two runs cannot alternate inside it.

samples/s counts training samples; tokens/s counts useful LM tokens (text + the sample's own planned image
tokens, no padding, the same per sample for every strategy).

Also reported: image tokens per image of nanoVLM's plan vs upstream nanoVLM's scheme (huggingface/nanoVLM: long
side resized to 2048, 512-px tiles + one global view, 64 tokens each), for the same image mix (this run's small
images and the full-size mix of `padding.py`).

The input pipeline (`--sections pipeline,breakdown`), on rows whose images are JPEG photos (bytes; the photos of
`preprocess.py` at 640x480, 1024x768 and 1600x1200), so decoding is paid as in real training:

  pipeline    samples/s of `NanoVLMTrainer`'s dataloader + step with 0 vs 2 DataLoader workers and float32 vs uint8
              pixel transport (the image processor's `pixel_dtype`); after 2 uncounted warm-up batches each, every
              configuration runs `--turn-batches` batches per turn from a fresh dataloader iterator (worker
              start-up included), configurations taking turns; reported over all turns and for the median turn
  breakdown   where a step's time goes, measured in the training process (0 workers): JPEG decode, resize +
              patchify + normalise, the rest of collation (chat template, tokenising, labels), vision tower
              (forward + backward), LM (the rest of forward + backward), optimizer (clip + AdamW step); optionally
              drawn as a stacked bar (`--breakdown-plot docs/throughput_breakdown.png`)

    python benchmarks/throughput.py [--samples 1600] [--window 4] [--pad-batches 16] [--json PATH]
    python benchmarks/throughput.py --sections pipeline,breakdown [--breakdown-plot PATH]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque

import numpy as np

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import (
    argument_parser,
    environment,
    log_midpoints,
    median,
    pct,
    pyplot,
    save_figure,
    set_torch_threads,
    table,
    training_mix,
    upstream_nanovlm_tokens,
    write_json,
)
from processing import NanoVLMCollator, load_image

WORDS = ("the a digit cat cup page chart shows value of in on at left right top bottom red blue green small large "
         "line bar axis title text number year total price man woman car tree sky dog house road sign window "
         "table plot figure image photo screen button menu icon").split()
SNAP_SIZES = (32, 64, 96, 128, 192, 256, 384, 512)
SNAP_ASPECT_RATIOS = (1 / 3, 9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9, 3.0)


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


def training_arguments(output_dir: str, batch_size: int, lr: float, seed: int, workers: int, **extra):
    """The TrainingArguments every benchmark Trainer shares: CPU, no saving or reporting, gradient clipping at 1."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, learning_rate=lr, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", seed=seed, dataloader_num_workers=workers, max_grad_norm=1.0, **extra,
    )


def train_step(trainer, model, batch) -> float:
    """The Trainer's step (forward, loss over the batch's answer tokens, backward), clipping and the optimizer step."""
    loss = trainer.training_step(model, batch, num_items_in_batch=int((batch["labels"] != -100).sum()))
    trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    model.zero_grad(set_to_none=True)
    return float(loss)


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

    def image(self, index):
        from PIL import Image

        height, width = self.sizes[index]
        return Image.new("RGB", (width, height), ((37 * index) % 256, (91 * index) % 256, (53 * index) % 256))

    def __getitem__(self, index):
        row = {"image": self.image(index), "prompt": self.prompts[index], "answer": self.answers[index]}
        if self.useful_tokens is not None:
            row["useful_tokens"] = self.useful_tokens[index]
        return row


class BenchCollator(NanoVLMCollator):
    """NanoVLMCollator that logs (rows, useful tokens) of every batch in order (FIFO), optionally padding images.

    With `pad_to_max`, every image of a batch is first resized to its own plan, then pasted (top-left, background
    colour) on a canvas of the batch's largest planned height and width; the canvases go through the same
    processor, so the tower runs once over a padded batch and the LM sees the canvas' tokens.
    """

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


def image_token_comparison(processor_kwargs: dict, small_mix: dict, full_mix_samples: int, seed: int) -> dict:
    """Mean image tokens per image: nanoVLM's plan vs upstream nanoVLM's tiles, on this run's and the full mix."""
    from processing import NanoVLMImageProcessor

    out = {}
    full = training_mix(full_mix_samples, seed=seed)["image_sizes"]
    cases = {
        "throughput_mix": (small_mix["image_sizes"], NanoVLMImageProcessor(**processor_kwargs), processor_kwargs),
        "full_mix_budget_1024": (full, NanoVLMImageProcessor(), {"max_image_tokens": 1024, "max_image_size": 2048}),
        "full_mix_budget_256": (full, NanoVLMImageProcessor(max_image_tokens=256), {"max_image_tokens": 256,
                                                                                    "max_image_size": 2048}),
    }
    for name, (sizes, ip, settings) in cases.items():
        ours = np.array([ip.num_image_tokens(h, w) for h, w in sizes])
        up_2048 = np.array([upstream_nanovlm_tokens(h, w, resize_to_max_side=True) for h, w in sizes])
        up_cap = np.array([upstream_nanovlm_tokens(h, w, resize_to_max_side=False) for h, w in sizes])
        out[name] = {
            "images": len(sizes),
            "nanovlm_settings": settings,
            "ours_tokens_per_image": float(ours.mean()),
            "upstream_resize_to_2048_tokens_per_image": float(up_2048.mean()),
            "upstream_cap_2048_tokens_per_image": float(up_cap.mean()),
            "ratio_upstream_2048_over_ours": float(up_2048.mean() / ours.mean()),
            "ratio_upstream_cap_over_ours": float(up_cap.mean() / ours.mean()),
        }
    return out


def build_strategies(rows, processor, snap_processor, text_lengths, batch_size, seed, lr, output_dir, names):
    """One Trainer (and one copy of the same initial model) per strategy, with its own train dataloader."""
    import copy

    import torch
    from transformers import Trainer

    from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer, tiny_config
    from processing import BucketBatchSampler

    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    base = NanoVLMForConditionalGeneration(
        tiny_config(vocab_size=len(tokenizer), image_token_id=processor.image_token_id)
    )
    args = training_arguments(output_dir, batch_size, lr, seed, workers=0, remove_unused_columns=False)
    strategies = {}
    for name in names:
        log = deque()
        model = copy.deepcopy(base)
        if name in ("ours", "ours+snap"):
            # The sampler NanoVLMTrainer would build with BucketBatchSampler.from_dataset, built here from the known
            # sizes and text lengths (from_dataset would read every row again: slow for a large synthetic set).
            snap = name == "ours+snap"
            proc = snap_processor if snap else processor
            buckets = dict(size_buckets=log_midpoints(SNAP_SIZES),
                           aspect_ratio_edges=log_midpoints(SNAP_ASPECT_RATIOS)) if snap else {}
            sampler = BucketBatchSampler(rows.sizes, text_lengths, proc.image_processor, batch_size=batch_size,
                                         seed=seed, **buckets)
            trainer = NanoVLMTrainer(model=model, args=args, train_dataset=rows, processing_class=proc,
                                     data_collator=BenchCollator(proc, log), batch_sampler=sampler)
        elif name == "random":
            trainer = Trainer(model=model, args=args, train_dataset=rows,
                              data_collator=BenchCollator(processor, log))
        elif name == "pad-to-max":
            trainer = Trainer(model=model, args=args, train_dataset=rows,
                              data_collator=BenchCollator(processor, log, pad_to_max=True))
        else:
            raise ValueError(f"unknown strategy {name!r}")
        trainer.create_optimizer()
        strategies[name] = {"trainer": trainer, "model": model, "log": log, "loader": trainer.get_train_dataloader(),
                            "iterator": None}
    return strategies


def next_batch(strategy):
    """The strategy's next batch of its first epoch, or None when the epoch is over."""
    if strategy["iterator"] is None:
        strategy["iterator"] = iter(strategy["loader"])
    return next(strategy["iterator"], None)


def train_window(strategy, steps: int) -> dict:
    """Up to `steps` training steps (data loading included): seconds, samples, useful tokens, tower calls, padding."""
    trainer, model = strategy["trainer"], strategy["model"]
    done = samples = useful = lm_positions = tower_calls = patches = 0
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        batch = next_batch(strategy)
        if batch is None:
            strategy["finished"] = True
            break
        rows, useful_tokens = strategy["log"].popleft()
        losses.append(train_step(trainer, model, batch))
        done += 1
        samples += rows
        useful += useful_tokens
        lm_positions += batch["input_ids"].numel()
        grids = batch["image_grid_hw"]
        tower_calls += len({tuple(g) for g in grids.tolist()})
        patches += int(grids.prod(-1).sum())
    return {"seconds": time.perf_counter() - start, "steps": done, "samples": samples, "useful_tokens": useful,
            "lm_positions": lm_positions, "tower_calls": tower_calls, "tower_patches": patches,
            "loss_sum": float(np.sum(losses))}


def run(num_samples, window, pad_batches, batch_size, seed, threads, image_scale, text_scale, max_image_tokens,
        max_image_size, lr, names, full_mix_samples) -> dict:
    """One epoch per batching strategy, strategies taking turns every `window` batches: samples/s, tokens/s."""
    from processing import NanoVLMImageProcessor, NanoVLMProcessor

    set_torch_threads(threads)
    mix = training_mix(num_samples, seed=seed, image_scale=image_scale, text_scale=text_scale)
    tokenizer = bench_tokenizer()
    processor_kwargs = {"max_image_tokens": max_image_tokens, "max_image_size": max_image_size}
    processor = NanoVLMProcessor(NanoVLMImageProcessor(**processor_kwargs), tokenizer)
    snap_processor = NanoVLMProcessor(
        NanoVLMImageProcessor(**processor_kwargs, snap_sizes=list(SNAP_SIZES),
                              snap_aspect_ratios=list(SNAP_ASPECT_RATIOS)), tokenizer)
    rows = SyntheticRows(mix, tokens_per_word(tokenizer), seed)
    collator = NanoVLMCollator(processor)
    text_lengths = [collator.text_length({"prompt": p, "answer": a}) for p, a in zip(rows.prompts, rows.answers)]
    image_tokens = [processor.image_processor.num_image_tokens(h, w) for h, w in mix["image_sizes"]]
    rows.useful_tokens = [t + i for t, i in zip(text_lengths, image_tokens)]

    with tempfile.TemporaryDirectory() as output_dir:
        strategies = build_strategies(rows, processor, snap_processor, text_lengths, batch_size, seed, lr,
                                      output_dir, names)
        for name in names:
            warm_up(strategies[name])
        windows = alternate_windows(strategies, names, window, pad_batches)

    results = {name: strategy_figures(windows[name], num_samples, padded_images=name == "pad-to-max")
               for name in names}
    ratios = {}
    for a, b in (("ours", "random"), ("ours", "pad-to-max"), ("ours+snap", "random"), ("ours+snap", "ours")):
        if a in results and b in results:
            ratios[f"{a}_vs_{b}"] = {key: results[a][key] / results[b][key]
                                     for key in ("samples_per_second", "useful_tokens_per_second")}
    return {
        "benchmark": "throughput",
        "settings": {
            "samples": num_samples, "window_steps": window, "pad_to_max_batches": pad_batches,
            "batch_size": batch_size, "seed": seed, "torch_threads": threads, "image_scale": image_scale,
            "text_scale": text_scale, "max_image_tokens": max_image_tokens, "max_image_size": max_image_size,
            "model": "tiny_config (~1M parameters, random weights), fp32",
            "training_loop": "each strategy's Trainer dataloader (one epoch) + Trainer.training_step + clip + AdamW "
                             "step, strategies alternating every window_steps batches",
            "mean_text_tokens": float(np.mean(text_lengths)), "mean_image_tokens": float(np.mean(image_tokens)),
            "snap_sizes": list(SNAP_SIZES), "snap_aspect_ratios": [round(r, 4) for r in SNAP_ASPECT_RATIOS],
        },
        "goal": {"ours_vs_random_samples_per_second_min": 2.0},
        "strategies": results,
        "ratios": ratios,
        "image_tokens_vs_upstream": image_token_comparison(processor_kwargs, mix, full_mix_samples, seed),
        "environment": environment(),
    }


def warm_up(strategy: dict) -> None:
    """One uncounted step on a batch from a second, throw-away iterator of the strategy's dataloader."""
    warm_iterator = iter(strategy["trainer"].get_train_dataloader())
    batch = next(warm_iterator)
    strategy["log"].popleft()
    strategy["trainer"].training_step(strategy["model"], batch,
                                      num_items_in_batch=int((batch["labels"] != -100).sum()))
    strategy["model"].zero_grad(set_to_none=True)
    del warm_iterator
    strategy["log"].clear()


def alternate_windows(strategies: dict, names: list[str], window: int, pad_batches: int) -> dict[str, list[dict]]:
    """Train every strategy to the end of its epoch (pad-to-max: `pad_batches` batches), `window` batches a turn,
    the strategy that goes first rotating each round. Returns each strategy's windows (`train_window` results)."""
    windows = {name: [] for name in names}

    def left(name):  # batches pad-to-max still has to train
        return pad_batches - sum(w["steps"] for w in windows[name])

    round_index = 0
    while True:
        active = [n for n in names if not strategies[n].get("finished") and not (n == "pad-to-max" and left(n) <= 0)]
        if not active:
            return windows
        order = active[round_index % len(active):] + active[: round_index % len(active)]  # rotate the leader
        for name in order:
            steps = min(window, left(name)) if name == "pad-to-max" else window
            result = train_window(strategies[name], steps)
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


def report(figures: dict) -> str:
    s = figures["settings"]
    rows = []
    for name, f in figures["strategies"].items():
        rows.append([name, f["batches"], round(f["samples_per_second"], 1), round(f["useful_tokens_per_second"]),
                     round(f["seconds_per_batch"], 3),
                     pct(f["lm_padding"]),
                     round(f["lm_positions_per_sample"]), round(f["tower_calls_per_batch"], 2),
                     round(f["tower_patches_per_sample"])])
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
    rows = []
    for name, c in figures["image_tokens_vs_upstream"].items():
        rows.append([name, c["images"],
                     f"{c['nanovlm_settings']['max_image_tokens']}/{c['nanovlm_settings']['max_image_size']}",
                     round(c["ours_tokens_per_image"]), round(c["upstream_resize_to_2048_tokens_per_image"]),
                     round(c["ratio_upstream_2048_over_ours"], 2), round(c["upstream_cap_2048_tokens_per_image"]),
                     round(c["ratio_upstream_cap_over_ours"], 2)])
    out.append("")
    out.append(table(["image mix", "images", "budget/max size", "ours tok/img", "upstream (resize to 2048)",
                      "x ours", "upstream (cap 2048)", "x ours"], rows,
                     title="Image tokens per image: nanoVLM's plan vs upstream nanoVLM (512-px tiles + global view, "
                           "64 tokens each)"))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# The input pipeline: workers, uint8 transport, and where a step's time goes
# --------------------------------------------------------------------------------------------------------------

PIPELINE_SIZES = ((640, 480), (1024, 768), (1600, 1200))


class PhotoRows:
    """Rows {"image": JPEG bytes, "prompt", "answer"}: the benchmark photos, cycled, with the mix's text lengths."""

    def __init__(self, num_samples: int, tokens_per_word: float, seed: int, quick: bool):
        from preprocess import encoded_photos

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


def _pipeline_processor(tokenizer, pixel_dtype: str, max_image_tokens: int, max_image_size: int):
    from processing import NanoVLMImageProcessor, NanoVLMProcessor

    return NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=max_image_tokens, max_image_size=max_image_size,
                                                  pixel_dtype=pixel_dtype), tokenizer)


def _pipeline_trainer(model, rows, processor, text_lengths, batch_size, seed, lr, workers, output_dir):
    from modeling_nanovlm import NanoVLMTrainer
    from processing import BucketBatchSampler

    args = training_arguments(output_dir, batch_size, lr, seed, workers)
    sampler = BucketBatchSampler(rows.sizes, text_lengths, processor.image_processor, batch_size=batch_size, seed=seed)
    trainer = NanoVLMTrainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                             batch_sampler=sampler, auto_workers=False)
    trainer.create_optimizer()
    return trainer


def run_pipeline(num_samples, turn_batches, turns, batch_size, seed, threads, max_image_tokens, max_image_size, lr,
                 quick, workers_list=(0, 2), dtypes=("float32", "uint8")) -> dict:
    """samples/s for every (workers, pixel dtype): fresh iterator per turn, `turn_batches` batches, turns rotating."""
    import copy

    import torch

    from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config

    set_torch_threads(threads)
    tokenizer = bench_tokenizer()
    rows = PhotoRows(num_samples, tokens_per_word(tokenizer), seed, quick)
    processors = {d: _pipeline_processor(tokenizer, d, max_image_tokens, max_image_size) for d in dtypes}
    collator = NanoVLMCollator(processors[dtypes[0]])
    text_lengths = [collator.text_length(rows[i]) for i in range(len(rows))]
    torch.manual_seed(seed)
    base = NanoVLMForConditionalGeneration(
        tiny_config(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>")))
    configs = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for workers in workers_list:
            for dtype in dtypes:
                model = copy.deepcopy(base)
                trainer = _pipeline_trainer(model, rows, processors[dtype], text_lengths, batch_size, seed, lr, workers,
                                            output_dir)
                configs[f"{workers} workers, {dtype}"] = {"trainer": trainer, "model": model, "workers": workers,
                                                           "pixel_dtype": dtype, "seconds": 0.0, "samples": 0,
                                                           "batches": 0, "pixel_bytes": 0, "turn_seconds": []}
        names = list(configs)
        for name in names:  # warm-up, not counted: first-call costs (allocator, lazy inits) of each configuration
            c = configs[name]
            for batch, _ in zip(c["trainer"].get_train_dataloader(), range(2)):
                train_step(c["trainer"], c["model"], batch)
        for turn in range(turns):
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                pipeline_turn(configs[name], turn_batches)
    return {"configs": pipeline_figures(configs, turn_batches), "reference": names[0],
            "settings": {"samples": num_samples, "turn_batches": turn_batches, "turns": turns, "batch_size": batch_size,
                         "torch_threads": threads, "max_image_tokens": max_image_tokens,
                         "max_image_size": max_image_size, "photos": ", ".join(f"{w}x{h}" for w, h in rows.photo_sizes),
                         "cpus": os.cpu_count(), "load_average": _load_average()}}


def pipeline_turn(config: dict, turn_batches: int) -> None:
    """`turn_batches` training steps from a fresh dataloader iterator, added to the configuration's counts."""
    start = time.perf_counter()
    iterator = iter(config["trainer"].get_train_dataloader())
    for _ in range(turn_batches):
        batch = next(iterator, None)
        if batch is None:
            break
        train_step(config["trainer"], config["model"], batch)
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


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class _Timer:
    """Adds the seconds spent in a block to `totals[key]`."""

    def __init__(self, totals: dict, key: str):
        self.totals, self.key = totals, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.totals[self.key] = self.totals.get(self.key, 0.0) + time.perf_counter() - self.start


def _timed_image_processor(totals: dict, **settings):
    """A NanoVLMImageProcessor that adds its decode time and its whole time to `totals`."""
    from processing import NanoVLMImageProcessor

    class TimedImageProcessor(NanoVLMImageProcessor):
        def _opened(self, raw):  # decodes images whose format cannot be decoded at reduced scale
            with _Timer(totals, "decode"):
                return super()._opened(raw)

        def _decoded(self, opened, plan):
            with _Timer(totals, "decode"):
                return super()._decoded(opened, plan)

        def preprocess(self, images, return_tensors=None, **overrides):
            with _Timer(totals, "image_processor"):
                return super().preprocess(images, return_tensors=return_tensors, **overrides)

    return TimedImageProcessor(**settings)


def run_breakdown(num_batches, batch_size, seed, threads, max_image_tokens, max_image_size, lr, quick,
                  dtypes=("float32", "uint8")) -> dict:
    """Seconds per sample of each part of a training step, in the training process, for each pixel dtype."""
    set_torch_threads(threads)
    tokenizer = bench_tokenizer()
    rows = PhotoRows(num_batches * batch_size, tokens_per_word(tokenizer), seed, quick)
    with tempfile.TemporaryDirectory() as output_dir:
        out = {dtype: breakdown_one_dtype(dtype, rows, tokenizer, batch_size, seed, max_image_tokens, max_image_size,
                                          lr, output_dir)
               for dtype in dtypes}
    return {"by_pixel_dtype": out,
            "settings": {"batches": num_batches, "batch_size": batch_size, "torch_threads": threads,
                         "max_image_tokens": max_image_tokens, "max_image_size": max_image_size,
                         "model": "tiny_config, fp32, CPU", "load_average": _load_average(),
                         "note": "the tower is timed on its own (forward + backward of its features); LM + connector "
                                 "is the full step's forward + backward minus that"}}


def breakdown_one_dtype(dtype, rows, tokenizer, batch_size, seed, max_image_tokens, max_image_size, lr,
                        output_dir) -> dict:
    """One epoch of `rows` (the first batch a warm-up), each part of every step timed: ms per sample and share."""
    import torch

    from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config
    from processing import NanoVLMProcessor

    totals = {}
    ip = _timed_image_processor(totals, max_image_tokens=max_image_tokens, max_image_size=max_image_size,
                                pixel_dtype=dtype)
    processor = NanoVLMProcessor(ip, tokenizer)
    collator = NanoVLMCollator(processor)
    text_lengths = [collator.text_length(rows[i]) for i in range(len(rows))]
    torch.manual_seed(seed)
    model = NanoVLMForConditionalGeneration(
        tiny_config(vocab_size=len(tokenizer), image_token_id=processor.image_token_id))
    trainer = _pipeline_trainer(model, rows, processor, text_lengths, batch_size, seed, lr, 0, output_dir)
    samples = 0
    for index, indices in enumerate(trainer.train_batch_sampler):
        if index == 0:  # warm-up batch, not counted
            train_step(trainer, model, trainer._prepare_inputs(collator([rows[i] for i in indices])))
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
    with _Timer(totals, "collate_total"):
        batch = collator(rows)
    batch = trainer._prepare_inputs(batch)
    with _Timer(totals, "tower"):
        features = model.get_image_features(batch["pixel_values"], batch["image_grid_hw"],
                                            batch["image_token_hw"], batch["image_shuffle_factor"])
        features.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    with _Timer(totals, "step_forward_backward"):
        trainer.training_step(model, batch, num_items_in_batch=int((batch["labels"] != -100).sum()))
    with _Timer(totals, "optimizer"):
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


def pipeline_report(pipeline: dict | None, breakdown: dict | None) -> str:
    out = []
    if pipeline:
        s = pipeline["settings"]
        rows = [[name, c["batches"], round(c["samples_per_second"], 1), f"{c['vs_first']:.2f}x",
                 round(c["median_turn_samples_per_second"], 1), f"{c['median_vs_first']:.2f}x",
                 f"{min(c['turn_seconds']):.1f}-{max(c['turn_seconds']):.1f}", round(c["pixel_mb_per_batch"], 2)]
                for name, c in pipeline["configs"].items()]
        out.append(table(["configuration", "batches", "samples/s", f"x {pipeline['reference']}",
                          "samples/s (median turn)", "x (median)", "turn seconds", "pixel MB/batch"],
                         rows, title=f"Input pipeline: tiny model, batch {s['batch_size']}, JPEG photos "
                                     f"{s['photos']}, budget {s['max_image_tokens']}/{s['max_image_size']} px, "
                                     f"{s['turns']} turns of {s['turn_batches']} batches per configuration (fresh "
                                     f"iterator each), {s['torch_threads']} torch thread(s), {s['cpus']} CPUs, "
                                     f"load {s['load_average']}"))
    if breakdown:
        by_dtype = breakdown["by_pixel_dtype"]
        parts = list(next(iter(by_dtype.values()))["ms_per_sample"])
        rows = [[part, *[x for d in by_dtype.values() for x in (round(d["ms_per_sample"][part], 2),
                                                                   f"{100 * d['share'][part]:.1f} %")]]
                for part in parts]
        rows.append(["total", *[x for d in by_dtype.values() for x in (round(d["total_ms_per_sample"], 2), "100 %")]])
        headers = ["part", *[h for dtype in by_dtype for h in (f"{dtype} ms/sample", f"{dtype} share")]]
        s = breakdown["settings"]
        out.append("")
        out.append(table(headers, rows, title=f"Where a training step's time goes (0 workers, in the training "
                                              f"process; {s['batches']} batches of {s['batch_size']}, load "
                                              f"{s['load_average']})"))
    return "\n".join(out)


def main(argv=None) -> dict:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--sections", default="strategies,pipeline,breakdown",
                        help="comma-separated, from strategies (batching strategies), pipeline (workers x pixel "
                             "dtype), breakdown (time per part of a step)")
    parser.add_argument("--samples", type=int, default=1600, help="rows in the data set: one epoch per strategy")
    parser.add_argument("--window", type=int, default=4, help="batches per window before the next strategy's turn")
    parser.add_argument("--pad-batches", type=int, default=16,
                        help="batches trained by pad-to-max (random batches: a sample of them costs like the epoch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on shared cores)")
    parser.add_argument("--image-scale", type=float, default=0.125, help="shrink the mix's image sides by this")
    parser.add_argument("--text-scale", type=float, default=0.25, help="shrink the mix's questions and answers by this")
    parser.add_argument("--max-image-tokens", type=int, default=64)
    parser.add_argument("--max-image-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--strategies", default="ours,random,pad-to-max",
                        help="comma-separated, from ours, ours+snap, random, pad-to-max")
    parser.add_argument("--turn-batches", type=int, default=8, help="pipeline: batches per turn (fresh iterator)")
    parser.add_argument("--turns", type=int, default=8, help="pipeline: turns per configuration")
    parser.add_argument("--breakdown-batches", type=int, default=12, help="breakdown: batches measured (+1 warm-up)")
    parser.add_argument("--breakdown-plot", metavar="PATH", help="breakdown: draw a stacked bar PNG here")
    args = parser.parse_args(argv)
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    unknown = sections - {"strategies", "pipeline", "breakdown"}
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}")
    if args.quick:
        args.samples, args.window, args.pad_batches, args.batch_size = 32, 2, 2, 8
        args.turn_batches, args.turns, args.breakdown_batches = 2, 1, 2
    figures = {"benchmark": "throughput"}
    printed = []
    if "strategies" in sections:
        names = [name.strip() for name in args.strategies.split(",") if name.strip()]
        figures.update(run(args.samples, args.window, args.pad_batches, args.batch_size, args.seed, args.threads,
                           args.image_scale, args.text_scale, args.max_image_tokens, args.max_image_size, args.lr,
                           names, full_mix_samples=1000 if args.quick else 20000))
        printed.append(report(figures))
    if "pipeline" in sections:
        figures["pipeline"] = run_pipeline(args.turn_batches * args.batch_size, args.turn_batches, args.turns,
                                           args.batch_size, args.seed, args.threads, args.max_image_tokens,
                                           args.max_image_size, args.lr, args.quick)
    if "breakdown" in sections:
        figures["breakdown"] = run_breakdown(args.breakdown_batches + 1, args.batch_size, args.seed, args.threads,
                                             args.max_image_tokens, args.max_image_size, args.lr, args.quick)
        if args.breakdown_plot:
            plot_breakdown(figures["breakdown"], args.breakdown_plot)
    if sections & {"pipeline", "breakdown"}:
        printed.append(pipeline_report(figures.get("pipeline"), figures.get("breakdown")))
    figures.setdefault("environment", environment())
    print("\n\n".join(printed))
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
