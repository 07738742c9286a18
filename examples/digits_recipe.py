"""The built-in task's recipe: train a tiny nanoVLM from scratch on digits, evaluate, save, reload, ask.

What `python examples/finetune.py` runs (with no --dataset). The task (`digits.py`): scikit-learn's real 8x8
digits, upscaled and pasted at a random place on a canvas of random size and aspect ratio; the model is asked
"Which digit is shown and where?" and answers like "7 top-left". 360 digits are held out (a fixed split) and only
used for evaluation (`digits_eval.py`).

Training runs through `NanoVLMTrainer` with a `BucketBatchSampler` and the `NanoVLMCollator`. Each epoch draws
new layouts for the same training digits, and the sampler re-plans from their sizes (`sizes_for_epoch`); a
curriculum widens the canvas range from small squares to the full range.

The recipe (`RECIPE`; any key can be changed with `--recipe KEY=VALUE`): LM weights drawn larger than usual
(std 0.08), a canvas curriculum (small squares first, then the full range of sizes and aspect ratios), budget-robust
training (factors 2 and 4 with a shared cell encoder; every batch draws its budget, so one model answers at any
budget lowered per call), locality and 2-D place in the connector (cell and token context convolutions, token
positions), a 1-layer 96-wide tower, lr 1e-3 with warmup and cosine decay, batch 16, 2600 steps. `--connector
perceiver` trains the Perceiver connector instead (a fixed 16 tokens per image, no budget draw).
What each choice was worth on this task, measured: docs/recipe.md ("Why each recipe value").
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer, tiny_config
from modeling_nanovlm.configuration_nanovlm import CONNECTOR_SETTINGS
from processing import BucketBatchSampler, NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor

from digits import QUESTION, DigitsTask, load_split, tokenizer_corpus  # examples/: on sys.path (finetune.py)
from digits_eval import evaluate_budgets, held_out_task, plot_budget_curve, print_budget_curve
from offline_tokenizer import build_tokenizer
from training_tools import (
    last_loss,
    make_optimizer,
    plot_loss_curve,
    reload_and_ask,
    save_and_push,
    set_generation_tokens,
    training_arguments,
)

# The tuned recipe for the built-in task; why each value is what it is: docs/recipe.md.
RECIPE = dict(
    max_steps=2600,
    batch_size=16,
    learning_rate=1e-3,  # vision tower
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
    shuffle_factors=(2, 4),  # on 128-384 px canvases budgets 144, 64 and 36 never pool; 16 pools the largest
    shared_cell_encoder=True,  # factor 4 merges four encoded 2x2 cells: it reuses what factor 2 learns
    cell_context_kernel=3,  # each encoded cell also carries its 3x3 neighbourhood before the merge,
    token_context_kernel=3,  # and each token its neighbouring tokens: a digit cut by token borders stays readable
    image_token_positions=True,  # each token knows its 2-D place (the LM's positions are 1-D)
    max_image_tokens=144,  # (384 / 16 / 2) ** 2: the largest canvas keeps every 2x2 patch cell, no pooling
    # budget-robust training: every batch draws its max_image_tokens from these (None: always max_image_tokens).
    # 4 puts factor 4 on the 128 px canvases of the curriculum's start too (16 tokens at factor 2 fit every
    # other budget there), so it trains from the first step
    train_budgets=(144, 64, 36, 16, 4),
    eval_budgets=(144, 64, 36, 16),  # the held-out digits are evaluated at each (the budget curve)
    perceiver_latents=16,  # --connector perceiver: tokens per image, whatever the budget
    perceiver_depth=1,
    perceiver_heads=4,
    perceiver_head_dim=32,
    perceiver_pooled_queries=True,  # queries start from their region's pooled content
    vision_layers=1,  # a 1-layer, 96-wide tower: as fast per step as wider or deeper ones, and cheaper
    vision_hidden=96,
    text_layers=2,
    text_hidden=128,
    text_init_range=0.08,  # LM weights ~N(0, 0.08) instead of 0.02: with 0.02 no digit signal flows back for long
    init_range=0.02,  # the connector's projections (the vision tower keeps DINOv3's own 0.02)
)

# What `--connector perceiver` changes: a fixed token count leaves no budget to draw or to lower, and its steps cost
# more, so it gets fewer.
PERCEIVER_RECIPE = dict(train_budgets=None, max_steps=2200)

# Command-line settings that replace a recipe value (`--batch_size 4` is `--recipe batch_size=4`).
RECIPE_FLAGS = ("max_steps", "batch_size", "min_side", "max_side", "max_image_tokens")


def recipe_from_args(args) -> dict:
    """RECIPE with the command line's changes: `--connector`, `--recipe KEY=VALUE`, then the named flags."""
    recipe = dict(RECIPE, connector=args.connector)
    if args.connector == "perceiver":
        recipe.update(PERCEIVER_RECIPE)
    for item in args.recipe:
        key, _, value = item.partition("=")
        if key not in recipe:
            raise SystemExit(f"--recipe {item}: unknown recipe key; known: {sorted(recipe)}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--recipe {item}: the value must be JSON (e.g. 256, 1e-3, [2, 4], null)") from error
        recipe[key] = tuple(value) if isinstance(value, list) else value
    for name in RECIPE_FLAGS:
        if getattr(args, name) is not None:
            recipe[name] = getattr(args, name)
    if args.learning_rate is not None:
        recipe["learning_rate"] = recipe["connector_learning_rate"] = recipe["text_learning_rate"] = args.learning_rate
    if args.connector == "perceiver":
        recipe["eval_budgets"] = tuple(b for b in recipe["eval_budgets"] if b >= recipe["perceiver_latents"])
    return recipe


def curriculum(num_epochs: int, min_side: int, max_side: int, start: float, full: float):
    """side_schedule(epoch) -> (min_side, largest side): min_side x min_side canvases only for the first `start`
    fraction of the epochs, then the largest side grows linearly to `max_side`, reached at the `full` fraction.

    The square start is what lets the digit take off (docs/recipe.md).
    """

    def schedule(epoch: int) -> tuple[int, int]:
        fraction = epoch / max(1, num_epochs)
        if fraction < start or max_side <= min_side:
            return min_side, min_side
        grown = min(1.0, (fraction - start) / max(1e-9, full - start))
        return min_side, int(round(min_side + grown * (max_side - min_side)))

    return schedule


def connector_settings(recipe: dict) -> dict:
    """The recipe's connector and that mode's settings (the config refuses the other mode's)."""
    mode = recipe["connector"]
    return {"connector": mode, **{name: recipe[name] for name in CONNECTOR_SETTINGS[mode]}}


def build_digits_model(recipe: dict, seed: int, corpus: list[str] | None = None):
    """Offline tokenizer (on `corpus`, by default the task's texts), a tiny model, and the processor built from the
    model's config (one source of settings)."""
    tokenizer = build_tokenizer(corpus or tokenizer_corpus())
    config = tiny_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(NanoVLMProcessor.image_token),
        **connector_settings(recipe),
        vision=dict(num_hidden_layers=recipe["vision_layers"], hidden_size=recipe["vision_hidden"],
                    intermediate_size=4 * recipe["vision_hidden"]),
        text=dict(num_hidden_layers=recipe["text_layers"], hidden_size=recipe["text_hidden"],
                  intermediate_size=3 * recipe["text_hidden"], initializer_range=recipe["text_init_range"],
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id),
        initializer_range=recipe["init_range"],
    )
    image_processor = NanoVLMImageProcessor.from_model_config(
        config, max_image_tokens=recipe["max_image_tokens"],
        max_image_size=recipe["max_image_size"] or recipe["max_side"],
    )
    processor = NanoVLMProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = NanoVLMForConditionalGeneration(config)
    set_generation_tokens(model, tokenizer)
    return model, processor


# Text-only questions the real LM answers before and after learning to see: with the LM frozen, the same answers.
TEXT_QUESTIONS = (
    "What is the capital of France?", "How many days are in a week?", "What colour is the sky on a clear day?",
    "What is 7 plus 5?", "Name a fruit that is yellow.", "What do bees make?", "What is the opposite of hot?",
    "How many legs does a spider have?", "What is the largest planet in the solar system?",
    "Which animal is known as the king of the jungle?", "What is water made of?", "What is 9 times 3?",
    "What language is spoken in Spain?", "What season comes after winter?", "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?", "What shape has three sides?", "What is the first letter of the alphabet?",
    "How many minutes are in an hour?", "What do plants need to grow?",
)


def build_real_lm_model(recipe: dict, seed: int, text_model: str, vision_model: str | None = None):
    """A pretrained LM (folder, Hub id or GGUF file), frozen, with a tower from scratch (the recipe's shape) or taken
    from `vision_model` (a saved nanoVLM's tower, or a DINOv3 checkpoint), and the recipe's connector."""
    processor = NanoVLMProcessor.from_backbones(text_model)  # the LM's tokenizer and chat template
    tower = vision_model or tiny_config(vision=dict(
        num_hidden_layers=recipe["vision_layers"], hidden_size=recipe["vision_hidden"],
        intermediate_size=4 * recipe["vision_hidden"], initializer_range=recipe["init_range"])).vision_config
    torch.manual_seed(seed)
    model = NanoVLMForConditionalGeneration.from_backbones(
        tower, text_model, tokenizer=processor.tokenizer, initializer_range=recipe["init_range"],
        **connector_settings(recipe),
    )
    for parameter in [*model.language_model.parameters(), *model.lm_head.parameters()]:
        parameter.requires_grad_(False)  # the LM keeps what it knows; tower and connector learn to speak to it
    processor.image_processor = NanoVLMImageProcessor.from_model_config(
        model.config, max_image_tokens=recipe["max_image_tokens"],
        max_image_size=recipe["max_image_size"] or recipe["max_side"],
    )
    set_generation_tokens(model, processor.tokenizer)
    return model, processor


def text_answers(model, processor, max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to TEXT_QUESTIONS (no image), through the processor's chat template."""
    prompts = [processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
               for question in TEXT_QUESTIONS]
    model.eval()
    with torch.no_grad():
        inputs = processor(text=prompts, return_tensors="pt").to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def print_text_answers(title: str, answers: list[str]) -> None:
    print(title)
    for question, answer in zip(TEXT_QUESTIONS, answers):
        print(f"  Q: {question}  A: {answer}")


def describe_model(model, recipe: dict) -> str:
    """One line: parameter count, connector, budget and the budgets batches draw from."""
    budgets = list(recipe["train_budgets"]) if recipe["train_budgets"] else None
    if recipe["connector"] == "perceiver":
        tokens = f"Perceiver connector, {recipe['perceiver_latents']} tokens per image"
    else:
        tokens = (f"image budget {recipe['max_image_tokens']} tokens, shuffle factors {list(recipe['shuffle_factors'])}"
                  + (f", training budgets drawn per batch from {budgets}" if budgets else ""))
    return f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {tokens}"


def make_trainer(model, processor, recipe: dict, train: DigitsTask, training_args, seed: int) -> NanoVLMTrainer:
    """The Trainer with a bucketing sampler that re-plans every epoch from that epoch's canvas sizes."""
    collator = NanoVLMCollator(processor)
    text_length = collator.text_length({"prompt": QUESTION, "answer": "0 top-left"})  # every answer: same length
    # One sampler per process, each knowing the world size: every sample once per epoch over all processes.
    # `sizes_for_epoch` moves the task to the epoch (new layouts) and hands the sampler their sizes to re-plan.
    sampler = BucketBatchSampler(train.sizes(), [text_length] * len(train), processor.image_processor,
                                 batch_size=recipe["batch_size"], seed=seed, num_replicas=training_args.world_size,
                                 budgets=list(recipe["train_budgets"]) if recipe["train_budgets"] else None,
                                 sizes_for_epoch=train.sizes_for_epoch)
    optimizer = make_optimizer(model, {"vision_tower": recipe["learning_rate"],
                                       "connector": recipe["connector_learning_rate"],
                                       "language_model": recipe["text_learning_rate"]}, recipe["weight_decay"])
    return NanoVLMTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator,
                          processing_class=processor, batch_sampler=sampler, optimizers=(optimizer, None))


def run(args) -> dict:
    """Train on the built-in task, then (on the main process) evaluate, write the metrics and plots, save, reload."""
    recipe = recipe_from_args(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text_model = getattr(args, "text_model", None)
    if text_model:
        model, processor = build_real_lm_model(recipe, args.seed, text_model, args.vision_model)
        answers_before = text_answers(model, processor)
        print_text_answers(f"text-only answers of {text_model} before training:", answers_before)
    else:
        model, processor = build_digits_model(recipe, args.seed)
    print(describe_model(model, recipe))

    split = load_split()
    train_images, train_labels = split["train"]
    train_size = min(args.train_samples or len(train_labels), len(train_labels))
    training_args = training_arguments(output_dir, recipe["max_steps"], recipe["batch_size"], recipe["learning_rate"],
                                       recipe["warmup_ratio"], args.seed, args.logging_steps)
    world_size = training_args.world_size  # on N processes one optimizer step takes N batches
    steps_per_epoch = math.ceil(math.ceil(train_size / recipe["batch_size"]) / world_size)
    num_epochs = math.ceil(recipe["max_steps"] / steps_per_epoch)
    schedule = curriculum(num_epochs, recipe["min_side"], recipe["max_side"], recipe["curriculum_start"],
                          recipe["curriculum_full"])
    train = DigitsTask(train_images, train_labels, seed=args.seed, side_schedule=schedule, limit=train_size,
                       digit_min=recipe["digit_min"], digit_max=recipe["digit_max"], noise=recipe["noise"],
                       margin=recipe["margin"])
    trainer = make_trainer(model, processor, recipe, train, training_args, args.seed)
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

    test = held_out_task(recipe, *split["test"], limit=args.eval_samples)
    rows = [test[i] for i in sorted(range(len(test)), key=test.canvas_size)]  # same-shape images share tower calls
    metrics = evaluate(model, processor, rows, recipe, args.max_new_tokens or 8)
    metrics.update(train_seconds=round(train_seconds, 1), train_samples=int(train_samples),
                   final_loss=last_loss(trainer.state.log_history), seed=args.seed)
    if text_model:
        answers_after = text_answers(model, processor)
        print_text_answers("text-only answers after training:", answers_after)
        unchanged = sum(a == b for a, b in zip(answers_before, answers_after))
        print(f"{unchanged} of {len(answers_after)} text-only answers unchanged")
        metrics.update(text_model=str(text_model), vision_model=args.vision_model, text_answers=answers_after,
                       text_answers_unchanged=unchanged)
    sides = [(epoch * steps_per_epoch, schedule(epoch)[1]) for epoch in range(num_epochs)]
    sides.append((recipe["max_steps"], sides[-1][1]))
    write_report(metrics, trainer.state.log_history, sides, output_dir, recipe)
    return save_and_reload(model, processor, metrics, output_dir / "model", test[0], args)


def evaluate(model, processor, rows: list[dict], recipe: dict, max_new_tokens: int) -> dict:
    """The metrics of the held-out rows: accuracy at the saved processor's budget and the whole budget curve."""
    default = recipe["max_image_tokens"]  # the saved processor's budget: what a user gets without an override
    started = time.perf_counter()
    curve = evaluate_budgets(model, processor, rows, sorted({default, *recipe["eval_budgets"]}, reverse=True),
                             max_new_tokens)
    return {
        "task": "digits",
        "connector": recipe["connector"],
        **{key: curve[str(default)][key] for key in ("digit_accuracy", "quadrant_accuracy", "both_accuracy")},
        "max_image_tokens": default,
        "budget_curve": curve,
        "eval_samples": len(rows),
        "eval_seconds": round(time.perf_counter() - started, 1),
        "max_steps": recipe["max_steps"],
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "recipe": {key: list(value) if isinstance(value, tuple) else value for key, value in recipe.items()},
    }


def write_report(metrics: dict, log_history: list[dict], sides: list, output_dir: Path, recipe: dict) -> None:
    """Print the results and write metrics.json, loss_curve.png and budget_curve.png."""
    default = metrics["max_image_tokens"]
    print(f"held-out ({metrics['eval_samples']} digits never trained on): digit accuracy "
          f"{metrics['digit_accuracy']:.1%}, quadrant accuracy {metrics['quadrant_accuracy']:.1%} at the default "
          f"budget of {default} tokens (training took {metrics['train_seconds']:.0f}s)")
    print("held-out accuracy when the budget is lowered per call (processor(..., max_image_tokens=B)):")
    print_budget_curve(metrics["budget_curve"])
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss_curve(log_history, output_dir / "loss_curve.png",
                    f"nanoVLM on digits: held-out digit {metrics['digit_accuracy']:.0%}, "
                    f"quadrant {metrics['quadrant_accuracy']:.0%}", sides)
    plot_budget_curve(metrics["budget_curve"], output_dir / "budget_curve.png",
                      f"one nanoVLM ({recipe['connector']}), held-out digits at each budget")


def save_and_reload(model, processor, metrics: dict, folder: Path, sample: dict, args) -> dict:
    """Save the Hub-ready folder (model card with the metrics), push it if asked, reload it and ask one question."""
    card_metrics = {key: round(metrics[key], 4) if isinstance(metrics[key], float) else metrics[key]
                    for key in ("digit_accuracy", "quadrant_accuracy", "budget_curve", "train_seconds",
                                "train_samples", "eval_samples", "max_steps")}
    save_and_push(model, processor, folder, args.push_to_hub, metrics=card_metrics)
    answer = reload_and_ask(folder, sample["image"], QUESTION, args.max_new_tokens or 8)
    print(f"reloaded {folder} through AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True)")
    print(f"Q: [held-out {sample['image'].width}x{sample['image'].height} image] {QUESTION}")
    print(f"A: {answer}    (truth: {sample['answer']})")
    metrics["reloaded_answer"] = answer
    return metrics
