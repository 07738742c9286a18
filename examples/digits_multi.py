"""The multi-image variant of the built-in task: 2-4 digits, one per image, in one prompt, under one token budget.

    python examples/finetune.py --output_dir outputs/digits --threads 1      # the single-digit model first
    python examples/digits_multi.py --init_model outputs/digits/model --threads 1 --output_dir outputs/digits_multi
    python examples/digits_multi.py --max_steps 1000 --threads 1             # from scratch (does not learn: README)

Each sample shows 2-4 of the held-in digits, each on its own small canvas of random size and aspect ratio
(`sample_layout`, `render` from digits.py), and asks "Which digits are shown, in order?"; the answer is the digits
in image order, e.g. "7 3 1". The images of a prompt share `max_image_tokens_per_sample`: training draws it per
batch from `--train_budgets` (`BucketBatchSampler(..., budget_setting="max_image_tokens_per_sample")`), and the
held-out prompts (4 images each, digits never trained on) are evaluated at `--eval_budgets` per prompt, lowered per
call as a user would (`processor(..., max_image_tokens_per_sample=64)`). Writes `metrics.json` (with
`per_sample_budget_curve`) and `per_sample_budget_curve.png` to `--output_dir`.

`--init_model FOLDER` starts from a saved nanoVLM folder (model and processor, e.g. the main job's `DIR/model`)
instead of a tiny model from scratch: the single-digit model already reads a digit from ~36 tokens, so the fine-tune
only has to learn to answer for each image in turn. Its tokenizer is kept as it is (byte-level BPE encodes the new
question and answers too, in more pieces), so the embeddings it learned stay valid. It does not get there yet (the
README has the figures): the first image's digit is read at ~88 % and the last at ~60 %, the middle ones near
chance (with `--label_images` too): the 2-layer LM does not tell the middle images apart in 800-1600 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer  # noqa: E402
from processing import BucketBatchSampler, NanoVLMCollator, NanoVLMProcessor  # noqa: E402

from digits import load_split, render, sample_layout, tokenizer_corpus  # noqa: E402
from digits_recipe import RECIPE, build_digits_model, describe_model  # noqa: E402
from training_tools import generate_answers, make_optimizer, training_arguments  # noqa: E402

QUESTION = "Which digits are shown, in order?"
EVAL_SEED = 4321  # held-out prompts are the same on every run


def multi_prompt(count: int, label_images: bool = False) -> str:
    """The user turn for `count` images: the images, then the question. With `label_images` each image comes after
    "Image k: " (as multi-image VLM prompts often do): the LM's positions are 1-D and an image's tokens carry no
    mark of which image they belong to, so the labels are what it can tell the second image from the third by."""
    if label_images:
        return "".join(f"Image {k}: <image>\n" for k in range(1, count + 1)) + QUESTION
    return "<image>" * count + QUESTION


class MultiDigitsTask:
    """Prompts of `min_images`..`max_images` digits, one per canvas, as {"images", "prompt", "answer"} rows.

    Which digits, how many and every canvas are drawn from (seed, epoch, index); sizes are known without
    rendering (`sizes`), so the sampler plans every prompt's images together from sizes alone.
    """

    def __init__(self, images, labels, *, seed=0, length=None, min_images=2, max_images=4, min_side=96,
                 max_side=256, digit_min=56, digit_max=88, margin=8, label_images=False):
        self.images, self.labels, self.seed = images, labels, int(seed)
        self.label_images = label_images
        self.length = int(length or len(labels))
        self.counts = (min_images, max_images)
        self.sides = (min_side, max_side)
        self.digits = (digit_min, digit_max)
        self.margin = margin
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        self._samples = []
        for _ in range(self.length):
            count = int(rng.integers(self.counts[0], self.counts[1] + 1))
            digits = rng.integers(0, len(self.labels), count)
            layouts = [sample_layout(rng, *self.sides, *self.digits, self.margin) for _ in digits]
            self._samples.append((digits, layouts))

    def sizes(self) -> list[tuple]:
        return [tuple((layout.height, layout.width) for layout in layouts) for _, layouts in self._samples]

    def sizes_for_epoch(self, epoch: int) -> list[tuple]:
        self.set_epoch(epoch)
        return self.sizes()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        digits, layouts = self._samples[index]
        rng = np.random.default_rng([self.seed, self.epoch, 2, index])
        return {
            "images": [render(self.images[d], layout, rng) for d, layout in zip(digits, layouts)],
            "prompt": multi_prompt(len(digits), self.label_images),
            "answer": " ".join(str(int(self.labels[d])) for d in digits),
        }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/digits_multi")
    parser.add_argument("--init_model", metavar="FOLDER",
                        help="start from this saved nanoVLM folder (model + processor), e.g. the main job's "
                        "DIR/model (default: a tiny model from scratch)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="default: 1000 from scratch, 1600 from --init_model")
    parser.add_argument("--learning_rate", type=float,
                        help="every part's rate (default: the recipe's 1e-3)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_budgets", type=int, nargs="+", default=[288, 144, 64, 32])
    parser.add_argument("--eval_budgets", type=int, nargs="+", default=[288, 144, 64])
    parser.add_argument("--eval_samples", type=int, default=120, help="held-out prompts of 4 images each")
    parser.add_argument("--label_images", action="store_true",
                        help='write "Image k: " before each image in the prompt')
    parser.add_argument("--threads", type=int)
    return parser.parse_args(argv)


def evaluate(model, processor, rows, budgets) -> dict:
    """Per budget per prompt: the share of digits right (in their place), whole answers right, mean image tokens."""
    prompts = [processor.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
               for row in rows]
    curve = {}
    for budget in budgets:
        answers = generate_answers(model, processor, [row["images"] for row in rows], prompts, max_new_tokens=12,
                                   max_image_tokens_per_sample=budget)
        right = total = whole = 0
        # digits right by the image's place in the prompt: shows whether the LM loses track of which image is which
        by_position = np.zeros(max(len(row["images"]) for row in rows))
        for answer, row in zip(answers, rows):
            truth, said = row["answer"].split(), answer.split()
            hits = [a == b for a, b in zip(truth, said)] + [False] * max(0, len(truth) - len(said))
            right += sum(hits)
            total += len(truth)
            whole += said == truth
            by_position[: len(hits)] += hits
        tokens = [sum(processor.image_processor.num_image_tokens_per_sample(
            [(image.height, image.width) for image in row["images"]], max_image_tokens_per_sample=budget))
            for row in rows]
        curve[str(budget)] = {"digit_accuracy": right / total, "answer_accuracy": whole / len(rows),
                              "digit_accuracy_by_image": [round(hits / len(rows), 4) for hits in by_position],
                              "mean_image_tokens": float(np.mean(tokens)), "max_image_tokens": int(max(tokens))}
        print(f"  {budget:4d} tokens per prompt: digits {right / total:.1%}, whole answers {whole / len(rows):.1%}, "
              f"{np.mean(tokens):.1f} image tokens on average (at most {max(tokens)}); digits right by image "
              + " / ".join(f"{hits / len(rows):.0%}" for hits in by_position))
    return curve


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(int(b) for b in curve)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key, label in (("digit_accuracy", "digits right"), ("answer_accuracy", "whole answers right")):
        ax.plot(budgets, [100 * curve[str(b)][key] for b in budgets], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("max_image_tokens_per_sample (4 images per prompt)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("one budget per prompt: 4 digits, one per image")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # 256 px canvases at factor 2: 64 tokens each, so 4 images fit 288, and 144 / 64 make them share
    recipe = dict(RECIPE, connector="shuffle", max_side=256, max_image_tokens=64, train_budgets=None)
    if args.init_model:
        model = NanoVLMForConditionalGeneration.from_pretrained(args.init_model)
        processor = NanoVLMProcessor.from_pretrained(args.init_model)
        max_steps = args.max_steps or 1600  # digits right at 144 tokens: 400 steps 38 % (lr 5e-4), 800 47 %, 1600 50 %
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters from {args.init_model} "
              f"(per-image budget {processor.image_processor.max_image_tokens}); per-sample budgets drawn from "
              f"{args.train_budgets}")
    else:
        corpus = tokenizer_corpus() + [QUESTION, " ".join(str(d) for d in range(10))] * 4
        model, processor = build_digits_model(recipe, args.seed, corpus)
        max_steps = args.max_steps or 1000
        print(describe_model(model, recipe) + f"; per-sample budgets drawn from {args.train_budgets}")

    learning_rate = args.learning_rate or recipe["learning_rate"]
    split = load_split()
    train = MultiDigitsTask(*split["train"], seed=args.seed, label_images=args.label_images)
    training_args = training_arguments(output_dir, max_steps, args.batch_size, learning_rate, recipe["warmup_ratio"],
                                       args.seed)
    collator = NanoVLMCollator(processor)
    text_lengths = [collator.text_length({**row_text, "images": None}) for row_text in
                    ({"prompt": multi_prompt(len(sizes), args.label_images), "answer": " ".join("7" * len(sizes))}
                     for sizes in train.sizes())]
    sampler = BucketBatchSampler(train.sizes(), text_lengths, processor.image_processor, batch_size=args.batch_size,
                                 seed=args.seed, budgets=args.train_budgets,
                                 budget_setting="max_image_tokens_per_sample", sizes_for_epoch=train.sizes_for_epoch)
    optimizer = make_optimizer(model, {"vision_tower": learning_rate, "connector": learning_rate,
                                       "language_model": learning_rate})
    trainer = NanoVLMTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator,
                             processing_class=processor, batch_sampler=sampler, optimizers=(optimizer, None))
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    test = MultiDigitsTask(*split["test"], seed=EVAL_SEED, length=args.eval_samples, min_images=4, max_images=4,
                           label_images=args.label_images)
    rows = [test[i] for i in range(len(test))]
    print(f"held-out prompts ({len(rows)}, 4 images each, digits never trained on):")
    curve = evaluate(model, processor, rows, args.eval_budgets)
    metrics = {"task": "digits_multi", "per_sample_budget_curve": curve, "images_per_prompt": 4,
               "eval_samples": len(rows), "train_seconds": round(train_seconds, 1),
               "train_samples": trainer.state.global_step * args.batch_size, "max_steps": max_steps,
               "learning_rate": learning_rate, "init_model": args.init_model, "train_budgets": args.train_budgets,
               "label_images": args.label_images,
               "torch_threads": torch.get_num_threads(),
               "epochs": math.ceil(trainer.state.global_step / len(sampler)), "seed": args.seed}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot(curve, output_dir / "per_sample_budget_curve.png")
    print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'per_sample_budget_curve.png'}")
    return metrics


if __name__ == "__main__":
    main()
