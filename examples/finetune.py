"""The main job: train nanoVLM, evaluate it on held-out data, save a Hub-ready folder, reload it, ask it something.

    python examples/finetune.py                      # the built-in task, from scratch (a few minutes on 2 CPU cores)
    python examples/finetune.py --output_dir DIR --max_steps N --seed S
    python examples/finetune.py --vision_model V --text_model T --dataset D   # real backbones on a real dataset
    python examples/finetune.py --vision_model V --text_model T --dataset HuggingFaceM4/the_cauldron \
        --dataset_config vqav2 [--skip_bad_rows] [--num_proc 8]          # a Cauldron / FineVision subset

The built-in task (`examples/digits.py`): scikit-learn's real 8x8 digits, upscaled and pasted at a random place
on a canvas of random size and aspect ratio; the model is asked "Which digit is shown and where?" and answers
like "7 top-left". 360 digits are held out (a fixed split) and only used for evaluation.

Training runs through `NanoVLMTrainer` with a `BucketBatchSampler` and the `NanoVLMCollator`. For the built-in
task the sampler is re-planned every epoch (`EpochBucketSampler`): each epoch draws new layouts for the same
training digits, and a curriculum widens the canvas range from small squares to the full range.

Writes to `--output_dir`: `metrics.json` (held-out accuracy at the default budget, and `budget_curve`: accuracy
and mean image tokens at budgets 144 / 64 / 36 / 16), `loss_curve.png`, `budget_curve.png` and `model/` (model +
processor + a model card with the metrics and the budget table, loadable with `AutoModelForImageTextToText` /
`AutoProcessor` `.from_pretrained(folder, trust_remote_code=True)`). `--push_to_hub REPO` pushes that folder.
Under `torchrun --nproc_per_node N` it trains on N processes (every sample once per epoch) and process 0 evaluates.

The recipe (`RECIPE`), and what each part is worth on this task (2 shared CPU cores):
  - LM initialised with std 0.08 (not 0.02): with 0.02 the LM learns the answer format and the quadrant but the
    digit stays at chance for hundreds of steps; 0.08 makes it take off after ~150 steps (10 % -> 66 % in 400
    steps on 128 px canvases).
  - a curriculum by epoch: 128 x 128 canvases for the first 30 % (one geometry: the digit takes off there; mixed
    sizes from step 0 stayed at chance), then the largest side grows to 384 by 70 % of the run.
  - budget-robust training: shuffle factors (2, 3, 4), and every batch draws its budget from 144 / 64 / 64 / 36 /
    36 / 16 (`BucketBatchSampler(budgets=...)`), so one model answers at any of them when the budget is lowered per
    call (`processor(..., max_image_tokens=36)`). On 128-384 px canvases budgets 144, 64 and 36 never pool; 16
    pools the largest canvases. Measured (held-out digit at 144 / 64 / 36 / 16, 1700 steps, seed 0): factors
    (2, 4) with budgets drawn evenly 83.9 / 61.1 / 38.9 / 23.9 %; (2, 3, 4) 85.6 / 67.2 / 40.3 / 20.8 %;
    (2, 3, 4) with 64 and 36 drawn twice as often 82.5 / 72.5 / 48.6 / 21.9 %. Factors (1, 2, 4) learned more
    slowly (training loss 0.37 against 0.15 after ~410 steps: factor 1 spends 64 tokens on a 128 px canvas).
  - `--connector perceiver`: a fixed 16 tokens per image (1-layer Idefics2 resampler), no budget draw.
  - a 1-layer, 96-wide vision tower: learns as fast per step as 2 x 128 and costs much less on large canvases.
  - lr 1e-3 everywhere with 5 % warmup and cosine decay (2e-3 anywhere was worse), batch 16, 1700 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (str(HERE.parent), str(HERE)):  # runs from a checkout, installed or not
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config  # noqa: E402
from processing import (  # noqa: E402
    BucketBatchSampler,
    ImageInputError,
    NanoVLMCollator,
    NanoVLMImageProcessor,
    NanoVLMProcessor,
    add_image_sizes,
    add_text_lengths,
    keep_images_encoded,
    load_image,
)
from processing.collator import BadRowError, row_name  # noqa: E402

# The tuned recipe for the built-in task. Notes on why each value is what it is are in the README / report.
RECIPE = dict(
    max_steps=1700,
    batch_size=16,
    learning_rate=1e-3,  # vision tower; >= 2e-3 leaves it stuck at chance
    connector_learning_rate=1e-3,
    text_learning_rate=1e-3,
    warmup_ratio=0.05,
    weight_decay=0.0,
    min_side=128,  # canvas sides are drawn independently in [min_side, max_side]: sizes and aspect ratios vary
    max_side=384,
    digit_min=64,  # digit side in px: 4 to 6 patches of 16 px
    digit_max=96,
    noise=0.02,
    margin=16,  # digit centres stay this far from the midlines, so every quadrant is unambiguous
    max_image_size=None,  # the image processor's long-side limit; None: max_side (no canvas is downscaled)
    curriculum_start=0.3,  # fraction of the epochs on min_side x min_side canvases only
    curriculum_full=0.7,  # fraction of the epochs by which the largest side reaches max_side
    shuffle_factors=(2, 3, 4),  # on 128-384 px canvases budgets 144, 64 and 36 never pool; 16 pools the largest
    max_image_tokens=144,  # (384 / 16 / 2) ** 2: the largest canvas keeps every 2x2 patch cell, no pooling
    # budget-robust training: every batch draws its max_image_tokens from these (None: always max_image_tokens);
    # 64 and 36 listed twice: they lean on factors 3 and 4, which learn the digit more slowly than factor 2
    train_budgets=(144, 64, 64, 36, 36, 16),
    eval_budgets=(144, 64, 36, 16),  # the held-out digits are evaluated at each (the budget curve)
    perceiver_latents=16,  # --connector perceiver: tokens per image, whatever the budget
    perceiver_depth=1,
    perceiver_heads=4,
    perceiver_head_dim=32,
    vision_layers=1,  # a 1-layer, 96-wide tower learns the digits as fast per step as 2 x 128 (2 x 192: slower),
    vision_hidden=96,  # and a step on large canvases costs much less: more steps fit in the time
    text_layers=2,  # 1 LM layer: -4 points of digit accuracy
    text_hidden=128,
    text_init_range=0.08,  # LM weights ~N(0, 0.08) instead of 0.02: with 0.02 the digit stays at chance for
    # hundreds of steps (the LM learns the answer format and the quadrant, but no digit signal flows back)
    init_range=0.02,  # the connector's projections (the vision tower keeps DINOv3's own 0.02)
)
EVAL_SEED = 1234  # held-out layouts are the same on every run, whatever --seed
DATASET_DEFAULTS = dict(batch_size=8, learning_rate=5e-5, connector_learning_rate=1e-3, max_image_tokens=256,
                        max_side=1024, eval_samples=32, max_new_tokens=32)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/digits")
    parser.add_argument("--max_steps", type=int, default=None,
                        help=f"optimizer steps (digits: {RECIPE['max_steps']}; --dataset: one epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision_model", help="DINOv3 checkpoint (Hub id or folder) to fine-tune")
    parser.add_argument("--text_model", help="Llama-family LM with its tokenizer (Hub id or folder) to fine-tune")
    parser.add_argument("--dataset", help="datasets.load_dataset name, a data folder, or a save_to_disk folder, "
                        "with an image/images column and Cauldron/FineVision 'texts' turns, messages, or "
                        "question/prompt + answer")
    parser.add_argument("--dataset_config", help="the dataset's subset (config), e.g. 'vqav2' of "
                        "HuggingFaceM4/the_cauldron; for a local folder, a sub-folder of it, else a config name")
    parser.add_argument("--skip_bad_rows", action="store_true",
                        help="skip rows with a broken image or an empty answer (counted and reported at the end) "
                        "instead of stopping with an error naming the row")
    parser.add_argument("--num_proc", type=int, default=None,
                        help="processes for reading image sizes and text lengths once (datasets.map, cached)")
    parser.add_argument("--push_to_hub", metavar="REPO", help="after saving, push the model and processor to REPO")
    parser.add_argument("--connector", choices=("shuffle", "perceiver"), default="shuffle",
                        help="built-in task: 'shuffle' (pixel shuffle by factor 2 or 4 under the budget, trained across "
                        "budgets) or 'perceiver' (a fixed number of tokens per image, whatever the budget)")
    # Tuned defaults; these are for tests and experiments.
    hidden = argparse.SUPPRESS
    for name, kind in (("batch_size", int), ("learning_rate", float), ("train_samples", int), ("eval_samples", int),
                       ("min_side", int), ("max_side", int), ("max_image_tokens", int), ("threads", int),
                       ("max_new_tokens", int)):
        parser.add_argument(f"--{name}", type=kind, default=None, help=hidden)
    parser.add_argument("--dataset_split", default="train", help=hidden)
    parser.add_argument("--eval_split", default=None, help=hidden)
    parser.add_argument("--logging_steps", type=int, default=10, help=hidden)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=hidden)  # any RECIPE entry
    args = parser.parse_args(argv)
    real = [args.vision_model, args.text_model, args.dataset]
    if any(real) and not all(real):
        parser.error("--vision_model, --text_model and --dataset go together")
    if (args.dataset_config or args.skip_bad_rows or args.num_proc) and not args.dataset:
        parser.error("--dataset_config, --skip_bad_rows and --num_proc apply to --dataset")
    return args


# --- shared ---------------------------------------------------------------------------------------------


def tune_allocator():
    """Keep freed memory in the process (glibc): by default every array over 128 KiB is a fresh mmap, and in a
    small VM the page faults of those fresh pages cost more than the arithmetic (~2x on image preprocessing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the largest value glibc accepts
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD: do not hand freed memory back eagerly
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def setup_torch(args):
    tune_allocator()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_flush_denormal(True)  # ~15 % faster steps on CPU, identical losses
    torch.set_num_threads(args.threads or default_threads())


CORES = torch.get_num_threads()


def default_threads(own_threads: int = 0) -> int:
    """All cores when they are free; fewer when other processes keep them busy.

    On a small shared machine, intra-op threads that outnumber the free cores spin against the other
    processes: with two cores busy elsewhere, two threads ran a step several times (up to ~20x) slower
    than one thread, while on two free cores two threads are ~1.6x faster than one. `own_threads`: this
    process's running threads, counted in the load average and not by "others".
    """
    try:
        others = max(0.0, os.getloadavg()[0] - own_threads)
    except OSError:  # no load average on this platform
        return CORES
    return max(1, min(CORES, round(CORES - others)))


class AdaptiveThreads(TrainerCallback):
    """Re-checks the machine's load every `every` steps and sets torch's thread count (see `default_threads`)."""

    def __init__(self, every: int = 25):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            threads = default_threads(own_threads=torch.get_num_threads())
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)


def training_arguments(args, output_dir: Path, max_steps: int, batch_size: int, learning_rate: float,
                       warmup_ratio: float):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        max_steps=max_steps if max_steps else -1,
        num_train_epochs=1,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_ratio,  # a float below 1 is a fraction of the steps
        max_grad_norm=1.0,
        adam_beta2=0.98,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def _part(name: str) -> str:
    """A parameter name as `vision_tower.*`, `connector.*` or `language_model.*` (the LM head counts as the LM's)."""
    return "language_model." + name if name.startswith("lm_head.") else name.removeprefix("model.")


def make_optimizer(model, learning_rates: dict[str, float], weight_decay: float = 0.0):
    """AdamW with one parameter group per part (vision tower, connector, language model) and its own rate."""
    groups = []
    for prefix, lr in learning_rates.items():
        params = [p for name, p in model.named_parameters() if _part(name).startswith(prefix) and p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
    return torch.optim.AdamW(groups, betas=(0.9, 0.98))


def plot_loss_curve(log_history: list[dict], path: Path, title: str, side_schedule=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        ax.plot(*zip(*points), label="training loss (answer tokens)")
        if all(loss > 0 for _, loss in points):
            ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if side_schedule:
        other = ax.twinx()
        other.step(*zip(*side_schedule), where="post", color="tab:orange", alpha=0.6, label="largest canvas side")
        other.set_ylabel("largest canvas side (px)")
        other.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@torch.no_grad()
def generate_answers(model, processor, images, prompts, max_new_tokens: int, batch_size: int = 32,
                     **plan_overrides) -> list[str]:
    """Greedy answers for (images, full prompt) pairs -- `images[i]` is the list of prompt i's images -- batched
    in the given order (sort by image size: same-shape images share tower calls). `plan_overrides` (e.g.
    `max_image_tokens=36`) go to every processor call, as a user lowers the budget per call."""
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        inputs = processor(text=list(prompts[start : start + batch_size]),
                           images=[list(group) for group in images[start : start + batch_size]],
                           return_tensors="pt", **plan_overrides).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def set_generation_tokens(model, tokenizer):
    """Stop at the end of the assistant turn and pad with the tokenizer's pad token."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = end_of_turn if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id else tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


def save_and_push(model, processor, folder: Path, push_to_hub: str | None, metrics: dict | None = None):
    """The model folder with its processor and a model card carrying `metrics` (and the budget curve, if any).

    Call it on every process: all take part (FSDP gathers the sharded weights), the main one writes (and pushes),
    and the others wait for the folder before going on.
    """
    from accelerate import PartialState

    state = PartialState()
    main = state.is_main_process
    model.save_pretrained(folder, processor=processor, metrics=metrics,
                          **({"is_main_process": main} if state.num_processes > 1 else {}))
    if push_to_hub and main:
        model.push_to_hub(push_to_hub, processor=processor, metrics=metrics)
    state.wait_for_everyone()


def reload_and_ask(folder: Path, image, question: str, max_new_tokens: int) -> str:
    """Load the saved folder as a Hub user would (Auto classes, remote code) and answer one question."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    return generate_answers(model, processor, [[image]], [chat_prompt(processor, question)], max_new_tokens)[0]


def last_loss(log_history) -> float | None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return float(losses[-1]) if losses else None


# --- the built-in task ----------------------------------------------------------------------------------


class EpochBucketSampler(BucketBatchSampler):
    """A `BucketBatchSampler` over a dataset whose image sizes change with the epoch (`dataset.set_epoch`).

    On `set_epoch(e)` (and when resuming into epoch e) the dataset draws epoch e's layouts and the sampler
    re-plans buckets and lengths from the new sizes -- still from sizes alone, no pixels. With a fixed batch
    size the number of batches is the same every epoch, as the Trainer requires.
    """

    def __init__(self, dataset, text_lengths, image_processor, **kwargs):
        self.dataset = dataset
        self._text_lengths = list(text_lengths)
        self._kwargs = dict(kwargs)
        self._planned_epoch = dataset.epoch
        super().__init__(dataset.sizes(), self._text_lengths, image_processor, **kwargs)

    def _replan(self, epoch: int):
        if epoch == self._planned_epoch:
            return
        self.dataset.set_epoch(epoch)
        current, skip, yielded = self.epoch, self._skip, self._yielded
        BucketBatchSampler.__init__(self, self.dataset.sizes(), self._text_lengths, self.image_processor,
                                    **self._kwargs)
        self.epoch, self._skip, self._yielded = current, skip, yielded
        self._planned_epoch = epoch

    def set_epoch(self, epoch: int):
        self._replan(epoch)
        super().set_epoch(epoch)

    def load_state_dict(self, state: dict):
        self._replan(state["epoch"])
        super().load_state_dict(state)


def curriculum(num_epochs: int, min_side: int, max_side: int, start: float, full: float):
    """side_schedule(epoch) -> (min_side, largest side): min_side x min_side canvases only for the first `start`
    fraction of the epochs, then the largest side grows linearly to `max_side`, reached at the `full` fraction.

    The square start matters: with one fixed geometry the digit takes off after ~150 steps, while with sizes
    mixed from the start (even only 128-192 px) it stayed at chance for 950 steps; growing afterwards costs a
    short bump in the loss.
    """

    def schedule(epoch: int) -> tuple[int, int]:
        fraction = epoch / max(1, num_epochs)
        if fraction < start or max_side <= min_side:
            return min_side, min_side
        grown = min(1.0, (fraction - start) / max(1e-9, full - start))
        return min_side, int(round(min_side + grown * (max_side - min_side)))

    return schedule


def build_digits_model(recipe: dict, seed: int):
    """Offline tokenizer, image processor and processor, and a tiny model matched to them."""
    from digits import tokenizer_corpus
    from processing.offline_tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_corpus())
    connector = recipe.get("connector", "shuffle")
    perceiver = {name: recipe[name] for name in ("perceiver_latents", "perceiver_depth", "perceiver_heads",
                                                   "perceiver_head_dim")}
    image_processor = NanoVLMImageProcessor(
        patch_size=16,
        max_image_tokens=recipe["max_image_tokens"],
        max_image_size=recipe["max_image_size"] or recipe["max_side"],
        shuffle_factors=recipe["shuffle_factors"],  # must be the model's: it refuses plans with other factors
        connector=connector,
        perceiver_latents=perceiver["perceiver_latents"],
    )
    processor = NanoVLMProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = tiny_config(
        vocab_size=len(tokenizer),
        image_token_id=processor.image_token_id,
        shuffle_factors=recipe["shuffle_factors"],
        connector=connector,
        **perceiver,
        vision=dict(num_hidden_layers=recipe["vision_layers"], hidden_size=recipe["vision_hidden"],
                    intermediate_size=4 * recipe["vision_hidden"]),
        text=dict(num_hidden_layers=recipe["text_layers"], hidden_size=recipe["text_hidden"],
                  intermediate_size=3 * recipe["text_hidden"], initializer_range=recipe["text_init_range"],
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id),
        initializer_range=recipe["init_range"],
    )
    torch.manual_seed(seed)
    model = NanoVLMForConditionalGeneration(config)
    set_generation_tokens(model, tokenizer)
    return model, processor


def digits_recipe(args) -> dict:
    """RECIPE with the command line's changes: `--connector`, the tuning flags, `--set KEY=VALUE`."""
    recipe = dict(RECIPE, connector=args.connector)
    if args.connector == "perceiver":  # a fixed token count: there is no budget to draw or to lower
        recipe["train_budgets"] = None
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in recipe:
            raise SystemExit(f"--set {item}: unknown recipe key; known: {sorted(recipe)}")
        value = json.loads(value)
        recipe[key] = tuple(value) if isinstance(value, list) else value
    for name in ("max_steps", "batch_size", "min_side", "max_side", "max_image_tokens"):
        if getattr(args, name) is not None:
            recipe[name] = getattr(args, name)
    if args.learning_rate is not None:
        recipe["learning_rate"] = recipe["connector_learning_rate"] = recipe["text_learning_rate"] = args.learning_rate
    if args.connector == "perceiver":
        recipe["eval_budgets"] = tuple(b for b in recipe["eval_budgets"] if b >= recipe["perceiver_latents"])
    return recipe


def evaluate_budgets(model, processor, rows, budgets, max_new_tokens: int) -> dict[str, dict]:
    """Held-out accuracy at each budget, lowered per call as a user would: {"144": {"digit_accuracy", ...}, ...}."""
    from digits import QUESTION, parse_answer

    prompt = chat_prompt(processor, QUESTION)
    truths = [parse_answer(row["answer"]) for row in rows]
    curve = {}
    for budget in budgets:
        started = time.perf_counter()
        answers = generate_answers(model, processor, [[row["image"]] for row in rows], [prompt] * len(rows),
                                   max_new_tokens, max_image_tokens=budget)
        guesses = [parse_answer(answer) for answer in answers]
        plans = [processor.image_processor.plan(row["image"].height, row["image"].width, max_image_tokens=budget)
                 for row in rows]
        curve[str(budget)] = {
            "digit_accuracy": sum(g[0] == t[0] for g, t in zip(guesses, truths)) / len(rows),
            "quadrant_accuracy": sum(g[1] == t[1] for g, t in zip(guesses, truths)) / len(rows),
            "both_accuracy": sum(g == t for g, t in zip(guesses, truths)) / len(rows),
            "mean_image_tokens": round(sum(plan.num_tokens for plan in plans) / len(rows), 2),
            "pooled_fraction": (sum(plan.pooled for plan in plans) / len(rows)
                                if processor.image_processor.connector == "shuffle" else None),
            "shuffle_factors": {str(f): sum(plan.shuffle_factor == f for plan in plans)
                                for f in sorted({plan.shuffle_factor for plan in plans})},
            "eval_seconds": round(time.perf_counter() - started, 1),
        }
    return curve


def print_budget_curve(curve: dict):
    print("budget | digit  | quadrant | mean image tokens | pooled")
    for budget, point in curve.items():
        print(f"{budget:>6} | {point['digit_accuracy']:6.1%} | {point['quadrant_accuracy']:8.1%} | "
              f"{point['mean_image_tokens']:17.1f} | "
              + ("-" if point["pooled_fraction"] is None else f"{point['pooled_fraction']:.0%}"))


def plot_budget_curve(curve: dict, path: Path, title: str):
    """Held-out accuracy (left axis) and mean image tokens per image (right axis) against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(int(budget) for budget in curve)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("digit_accuracy", "digit accuracy"), ("quadrant_accuracy", "quadrant accuracy")):
        ax.plot(budgets, [100 * curve[str(b)][key] for b in budgets], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_ylim(0, 102)
    ax.set_xlabel("image-token budget (max_image_tokens, set per call)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    tokens = ax.twinx()
    tokens.plot(budgets, [curve[str(b)]["mean_image_tokens"] for b in budgets], color="tab:gray", ls="--",
                marker="s", label="mean image tokens per image")
    tokens.set_ylabel("image tokens per image")
    tokens.set_ylim(0, max(budgets) * 1.05)
    tokens.legend(loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_digits(args) -> dict:
    from digits import QUESTION, DigitsTask, load_split
    from modeling_nanovlm import NanoVLMTrainer

    recipe = digits_recipe(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model, processor = build_digits_model(recipe, args.seed)
    budgets = list(recipe["train_budgets"]) if recipe["train_budgets"] else None
    if recipe["connector"] == "perceiver":
        tokens = f"Perceiver connector, {recipe['perceiver_latents']} tokens per image"
    else:
        tokens = (f"image budget {recipe['max_image_tokens']} tokens, shuffle factors {list(recipe['shuffle_factors'])}"
                  + (f", training budgets drawn per batch from {budgets}" if budgets else ""))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {tokens}")

    split = load_split()
    task = dict(digit_min=recipe["digit_min"], digit_max=recipe["digit_max"], noise=recipe["noise"],
                margin=recipe["margin"])
    train_images, train_labels = split["train"]
    train_size = min(args.train_samples or len(train_labels), len(train_labels))
    training_args = training_arguments(args, output_dir, recipe["max_steps"], recipe["batch_size"],
                                       recipe["learning_rate"], recipe["warmup_ratio"])
    world_size = training_args.world_size  # on N processes one optimizer step takes N batches
    steps_per_epoch = math.ceil(math.ceil(train_size / recipe["batch_size"]) / world_size)
    num_epochs = math.ceil(recipe["max_steps"] / steps_per_epoch)
    schedule = curriculum(num_epochs, recipe["min_side"], recipe["max_side"], recipe["curriculum_start"],
                          recipe["curriculum_full"])
    train = DigitsTask(train_images, train_labels, seed=args.seed, side_schedule=schedule, limit=train_size, **task)

    collator = NanoVLMCollator(processor)
    text_length = collator.text_length({"prompt": QUESTION, "answer": "0 top-left"})  # every answer: same length
    # one sampler per process, each knowing the world size: every sample once per epoch over all processes
    sampler = EpochBucketSampler(train, [text_length] * len(train), processor.image_processor,
                                 batch_size=recipe["batch_size"], seed=args.seed,
                                 num_replicas=world_size, budgets=budgets)
    optimizer = make_optimizer(model, {"vision_tower": recipe["learning_rate"],
                                       "connector": recipe["connector_learning_rate"],
                                       "language_model": recipe["text_learning_rate"]}, recipe["weight_decay"])
    trainer = NanoVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=collator,
        processing_class=processor,
        batch_sampler=sampler,
        optimizers=(optimizer, None),
        callbacks=[] if args.threads else [AdaptiveThreads()],
    )
    print(f"training {recipe['max_steps']} steps of {recipe['batch_size']} on {len(train)} training digits "
          f"({num_epochs} epochs, new layouts each; canvases {recipe['min_side']}-{recipe['max_side']} px, "
          f"curriculum: {recipe['min_side']} px squares, then growing)")
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    full_epochs, rest = divmod(trainer.state.global_step, steps_per_epoch)
    train_samples = full_epochs * train_size + min(rest * recipe["batch_size"] * world_size, train_size)
    if not trainer.is_world_process_zero():  # on several processes one evaluates and reloads; all take part in saving
        save_and_push(model, processor, output_dir / "model", args.push_to_hub)
        return {}

    # held-out evaluation: the digits never trained on, on canvases over the whole size and aspect range
    test = DigitsTask(*split["test"], seed=EVAL_SEED, min_side=recipe["min_side"], max_side=recipe["max_side"],
                      limit=args.eval_samples, **task)
    order = sorted(range(len(test)), key=test.canvas_size)  # same-shape images share tower calls
    rows = [test[i] for i in order]
    max_new_tokens = args.max_new_tokens or 8
    started = time.perf_counter()
    default = recipe["max_image_tokens"]  # the saved processor's budget: what a user gets without an override
    eval_budgets = sorted({default, *recipe["eval_budgets"]}, reverse=True)
    curve = evaluate_budgets(model, processor, rows, eval_budgets, max_new_tokens)
    eval_seconds = time.perf_counter() - started
    metrics = {
        "task": "digits",
        "connector": recipe["connector"],
        **{key: curve[str(default)][key] for key in ("digit_accuracy", "quadrant_accuracy", "both_accuracy")},
        "max_image_tokens": default,
        "budget_curve": curve,
        "train_seconds": round(train_seconds, 1),
        "train_samples": int(train_samples),
        "eval_samples": len(rows),
        "eval_seconds": round(eval_seconds, 1),
        "max_steps": recipe["max_steps"],
        "final_loss": last_loss(trainer.state.log_history),
        "seed": args.seed,
        "torch_threads": args.threads or "adaptive",
        "load_average": [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "recipe": {key: list(value) if isinstance(value, tuple) else value for key, value in recipe.items()},
    }
    print(f"held-out ({len(rows)} digits never trained on): digit accuracy {metrics['digit_accuracy']:.1%}, "
          f"quadrant accuracy {metrics['quadrant_accuracy']:.1%} at the default budget of {default} tokens "
          f"(training took {train_seconds:.0f}s)")
    print("held-out accuracy when the budget is lowered per call (processor(..., max_image_tokens=B)):")
    print_budget_curve(curve)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    sides = [(epoch * steps_per_epoch, schedule(epoch)[1]) for epoch in range(num_epochs)]
    sides.append((recipe["max_steps"], sides[-1][1]))
    plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png",
                    f"nanoVLM on digits: held-out digit {metrics['digit_accuracy']:.0%}, "
                    f"quadrant {metrics['quadrant_accuracy']:.0%}", sides)
    plot_budget_curve(curve, output_dir / "budget_curve.png",
                      f"one nanoVLM ({recipe['connector']}), held-out digits at each budget")

    folder = output_dir / "model"
    card_metrics = {key: round(metrics[key], 4) if isinstance(metrics[key], float) else metrics[key]
                    for key in ("digit_accuracy", "quadrant_accuracy", "budget_curve", "train_seconds",
                                "train_samples", "eval_samples", "max_steps")}
    save_and_push(model, processor, folder, args.push_to_hub, metrics=card_metrics)
    sample = test[0]
    answer = reload_and_ask(folder, sample["image"], QUESTION, max_new_tokens)
    print(f"reloaded {folder} through AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True)")
    print(f"Q: [held-out {sample['image'].width}x{sample['image'].height} image] {QUESTION}")
    print(f"A: {answer}    (truth: {sample['answer']})")
    metrics["reloaded_answer"] = answer
    return metrics


# --- real backbones on a real dataset ----------------------------------------------------------------------


def load_rows(name: str, split: str, eval_split: str | None, eval_samples: int, seed: int,
              config: str | None = None):
    """(train, eval) `datasets.Dataset`s of rows the collator reads: an images/image column with Cauldron /
    FineVision `texts`, `messages`, or prompt (question, query, instruction) + answer.

    `name`: a `load_dataset` name (Hub id or data folder) or a `save_to_disk` folder. `config`: the subset -- for a
    local folder, its sub-folder `config` when there is one (a local copy of the Cauldron keeps one folder per
    subset), else `load_dataset(name, config)`. Without an eval split, a tenth of the rows (at most `eval_samples`)
    is held out. Every row carries `__index__`, its index in the loaded split, so errors name it; images stay
    encoded until the collator decodes them (`keep_images_encoded`).
    """
    import datasets

    path = Path(name)
    if config and path.is_dir() and (path / config).is_dir():
        path, name, config = path / config, str(path / config), None
    saved = path.is_dir() and any((path / marker).exists() for marker in
                                  ("state.json", "dataset_dict.json", "dataset_info.json"))
    if saved and config:
        raise ValueError(f"{name} is a save_to_disk folder with no sub-folder {config!r} (--dataset_config)")
    data = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(name, config)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{name}: no split {split!r}; it has {list(data)}")
        if eval_split is None:
            eval_split = next((s for s in ("test", "validation") if s in data and s != split), None)
        train, held_out = data[split], (data[eval_split] if eval_split else None)
    else:
        train, held_out = data, None

    def prepare(dataset):
        columns = set(dataset.column_names)
        if not {"texts", "messages", "prompt"} & columns:
            question = next((c for c in ("question", "query", "instruction") if c in columns), None)
            if question is None or "answer" not in columns:
                raise ValueError(f"{name}: need an image column with Cauldron-style 'texts', 'messages', or "
                                 f"question/prompt + answer columns; got {sorted(columns)}")
            dataset = dataset.rename_column(question, "prompt")
        if not {"image", "images"} & set(dataset.column_names):
            raise ValueError(f"{name}: no image or images column among {dataset.column_names}")
        dataset = keep_images_encoded(dataset)
        return dataset.add_column("__index__", np.arange(len(dataset)))

    train = prepare(train)
    if held_out is None:  # hold out a few rows for the evaluation
        count = max(1, min(eval_samples, len(train) // 10))
        parts = train.train_test_split(test_size=count, seed=seed)
        train, held_out = parts["train"], parts["test"]
    else:
        held_out = prepare(held_out)
    return train, held_out.select(range(min(eval_samples, len(held_out))))


def question_and_reference(processor, collator, row) -> tuple[str, list, str]:
    """(generation prompt, images, reference answer) of a row: everything before its last answer, and the answer."""
    messages, images = collator.conversation(row)
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    reference = messages[last]["content"]
    if not isinstance(reference, str):
        reference = " ".join(part.get("text", "") for part in reference if part.get("type") == "text")
    prompt = processor.apply_chat_template(list(messages[:last]), add_generation_prompt=True)
    return prompt, images, reference.strip()


def evaluation_rows(processor, collator, held_out) -> tuple[list, list[str]]:
    """(prompt, decoded images, reference) of each held-out row, and the reasons for the rows skipped.

    Images are decoded here, so a broken one is its row's error (or, with `collator.skip_bad_rows`, a skip)."""
    items, skipped = [], []
    for position, row in enumerate(held_out):
        try:
            prompt, images, reference = question_and_reference(processor, collator, row)
            decoded = []
            for number, image in enumerate(images):
                try:
                    decoded.append(load_image(image))
                except ImageInputError as error:
                    raise BadRowError(f"{row_name(row, position)}, image {number} of the row: {error}") from error
        except BadRowError as error:
            if not collator.skip_bad_rows:
                raise BadRowError(f"held-out {error} (--skip_bad_rows skips and counts such rows)") from error
            skipped.append(f"held-out {error}")
            continue
        items.append((prompt, decoded, reference))
    if not items:
        raise ValueError(f"no usable held-out row: all {len(held_out)} are bad ({skipped[:3]})")
    return items, skipped


def run_dataset(args) -> dict:
    from transformers import AutoConfig

    from modeling_nanovlm import NanoVLMTrainer

    settings = dict(DATASET_DEFAULTS)
    for name in ("batch_size", "max_image_tokens", "max_side", "eval_samples", "max_new_tokens"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.learning_rate is not None:
        settings["learning_rate"] = args.learning_rate
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    patch_size = int(AutoConfig.from_pretrained(args.vision_model).patch_size)
    processor = NanoVLMProcessor.from_backbones(args.text_model, patch_size=patch_size,
                                                max_image_tokens=settings["max_image_tokens"],
                                                max_image_size=settings["max_side"])
    model = NanoVLMForConditionalGeneration.from_backbones(
        args.vision_model, args.text_model, tokenizer=processor.tokenizer,
        shuffle_factors=processor.image_processor.shuffle_factors,
    )
    set_generation_tokens(model, processor.tokenizer)
    collator = NanoVLMCollator(processor, skip_bad_rows=args.skip_bad_rows)
    training_args = training_arguments(args, output_dir, args.max_steps, settings["batch_size"],
                                       settings["learning_rate"], 0.05)
    # Under torchrun / accelerate, the main process prepares the data first and the others read its datasets cache.
    with training_args.main_process_first(desc="dataset preparation"):
        train, held_out = load_rows(args.dataset, args.dataset_split, args.eval_split, settings["eval_samples"],
                                    args.seed, config=args.dataset_config)
        if args.train_samples:
            train = train.select(range(min(args.train_samples, len(train))))
        # The sampler's inputs, read once with datasets.map (in parallel with --num_proc, cached next time): image
        # sizes from file headers, text lengths from the chat template. Neither decodes an image.
        if "image_sizes" not in train.column_names:
            train = add_image_sizes(train, num_proc=args.num_proc, skip_bad_images=args.skip_bad_rows)
        train = add_text_lengths(train, collator.text_length, num_proc=args.num_proc)
    subset = f" ({args.dataset_config})" if args.dataset_config else ""
    print(f"fine-tuning {args.vision_model} + {args.text_model} on {args.dataset}{subset}: {len(train)} training "
          f"rows, {len(held_out)} held out")

    sampler = BucketBatchSampler.from_dataset(
        train, processor.image_processor, text_length="text_length", batch_size=settings["batch_size"],
        num_replicas=training_args.world_size, seed=args.seed,
    )
    optimizer = make_optimizer(model, {"vision_tower": settings["learning_rate"],
                                       "connector": settings["connector_learning_rate"],
                                       "language_model": settings["learning_rate"]})
    trainer = NanoVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=collator,
        processing_class=processor,
        batch_sampler=sampler,
        optimizers=(optimizer, None),
        callbacks=[] if args.threads else [AdaptiveThreads()],
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    # each process collated its own batches: the run's count is the sum
    skipped_train = int(trainer.accelerator.reduce(torch.tensor([collator.skipped_rows]), reduction="sum").item())
    folder = output_dir / "model"
    save_and_push(model, processor, folder, args.push_to_hub)  # every process takes part (FSDP gathers weights)
    if not trainer.is_world_process_zero():
        return {}  # evaluating and reloading happen once, on the main process

    items, skipped_eval = evaluation_rows(processor, collator, held_out)
    prompts, images, references = zip(*items)
    started = time.perf_counter()
    answers = generate_answers(model, processor, images, prompts, settings["max_new_tokens"], batch_size=8)
    eval_seconds = time.perf_counter() - started

    def norm(text):
        return " ".join(text.lower().split()).rstrip(".")

    metrics = {
        "task": "dataset",
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "exact_match": sum(norm(a) == norm(r) for a, r in zip(answers, references)) / len(references),
        "digit_accuracy": None,  # the built-in task's metrics; not defined for an arbitrary dataset
        "quadrant_accuracy": None,
        "train_seconds": round(train_seconds, 1),
        "train_samples": int(trainer.state.global_step * settings["batch_size"] * training_args.world_size),
        "eval_samples": len(references),
        "eval_seconds": round(eval_seconds, 1),
        "skipped_train_rows": skipped_train,
        "skipped_eval_rows": len(skipped_eval),
        "final_loss": last_loss(trainer.state.log_history),
        "seed": args.seed,
    }
    print(f"held-out exact match {metrics['exact_match']:.1%} on {len(references)} rows (greedy answers)")
    if args.skip_bad_rows:
        examples = (collator.skipped_examples + skipped_eval)[:3]
        print(f"skipped bad rows: {skipped_train} in training, {len(skipped_eval)} held out"
              + (f"; e.g. {examples}" if examples else ""))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png", f"nanoVLM fine-tuned on {args.dataset}")

    prompt, row_images, reference = items[0]
    before = generate_answers(model, processor, [row_images], [prompt], settings["max_new_tokens"])[0]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reloaded = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True)
    reloaded_processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    answer = generate_answers(reloaded, reloaded_processor, [row_images], [prompt], settings["max_new_tokens"])[0]
    print(f"reloaded {folder} through AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True)")
    print(f"Q: {prompt!r}\nA: {answer}    (reference: {reference})")
    metrics["reloaded_answer"] = answer
    metrics["reloaded_answer_matches"] = answer == before  # the saved folder answers as the trained model did
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_torch(args)
    return run_dataset(args) if args.dataset else run_digits(args)


if __name__ == "__main__":
    main()
