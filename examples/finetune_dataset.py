"""Fine-tune real backbones on a real dataset: a DINOv3 tower + a Llama-family LM, on image/question/answer rows.

    python examples/finetune.py --vision_model V --text_model T --dataset D [--dataset_config SUBSET]
        [--skip_bad_rows] [--num_proc 8] [--max_steps N] [--batch_size 8] [--learning_rate 5e-5]

(`finetune.py` reads the command line and calls `run` here.) The steps, top to bottom:
  1. build the processor and the model from the two backbones (`from_backbones`);
  2. load the rows (`load_rows`): a Hub id, a data folder or a `save_to_disk` folder, with an image / images column
     and Cauldron / FineVision `texts` turns, `messages`, or question/prompt + answer; images stay encoded;
  3. read every row's image sizes (file headers) and text length once, with `datasets.map` (cached), so the
     `BucketBatchSampler` plans batches without decoding an image;
  4. train with `NanoVLMTrainer` (one learning rate for the backbones, a larger one for the new connector);
  5. on the main process: greedy answers on held-out rows (exact match), metrics.json, loss_curve.png; save a
     Hub-ready folder (and push it with --push_to_hub), reload it through the Auto classes and answer one row.
A bad row (broken image, empty answer) stops the run with an error naming it, or is skipped and counted with
`--skip_bad_rows`. Under torchrun / accelerate launch every process trains on its share of each epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer
from processing import (
    BucketBatchSampler,
    ImageInputError,
    NanoVLMCollator,
    NanoVLMProcessor,
    add_image_sizes,
    add_text_lengths,
    keep_images_encoded,
    load_image,
)
from processing.training.collator import BadRowError, row_name

from training_tools import (  # examples/: on sys.path (finetune.py)
    generate_answers,
    last_loss,
    load_saved,
    make_optimizer,
    plot_loss_curve,
    save_and_push,
    set_generation_tokens,
    training_arguments,
)

# Defaults for real backbones; the command line's --batch_size, --learning_rate, ... replace them.
DATASET_DEFAULTS = dict(batch_size=8, learning_rate=5e-5, connector_learning_rate=1e-3, max_image_tokens=256,
                        max_side=1024, eval_samples=32, max_new_tokens=32)


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

    train = prepare_rows(train, name)
    if held_out is None:  # hold out a few rows for the evaluation
        count = max(1, min(eval_samples, len(train) // 10))
        parts = train.train_test_split(test_size=count, seed=seed)
        train, held_out = parts["train"], parts["test"]
    else:
        held_out = prepare_rows(held_out, name)
    return train, held_out.select(range(min(eval_samples, len(held_out))))


def prepare_rows(dataset, name: str):
    """The split with a `prompt` column when it has question/query/instruction + answer, images kept encoded, and
    `__index__`; a clear error when it has no image column or no text the collator reads."""
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


def settings_from_args(args) -> dict:
    """DATASET_DEFAULTS with the command line's values."""
    settings = dict(DATASET_DEFAULTS)
    for name in ("batch_size", "learning_rate", "max_image_tokens", "max_side", "eval_samples", "max_new_tokens"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    return settings


def build_model(args, settings: dict):
    """The processor (the LM's tokenizer, the tower's patch size) and the model from the two backbones."""
    from transformers import AutoConfig

    patch_size = int(AutoConfig.from_pretrained(args.vision_model).patch_size)
    processor = NanoVLMProcessor.from_backbones(args.text_model, patch_size=patch_size,
                                                max_image_tokens=settings["max_image_tokens"],
                                                max_image_size=settings["max_side"])
    model = NanoVLMForConditionalGeneration.from_backbones(
        args.vision_model, args.text_model, tokenizer=processor.tokenizer,
        shuffle_factors=processor.image_processor.shuffle_factors,
    )
    set_generation_tokens(model, processor.tokenizer)
    return model, processor


def training_rows(args, settings: dict, collator, training_args):
    """(train, held out) rows, the training rows with `image_sizes` and `text_length` columns for the sampler."""
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
    return train, held_out


def run(args) -> dict:
    """Fine-tune, then (on the main process) evaluate, write metrics.json and the loss plot, save, reload."""
    settings = settings_from_args(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, processor = build_model(args, settings)
    collator = NanoVLMCollator(processor, skip_bad_rows=args.skip_bad_rows)
    training_args = training_arguments(output_dir, args.max_steps, settings["batch_size"], settings["learning_rate"],
                                       0.05, args.seed, args.logging_steps)
    train, held_out = training_rows(args, settings, collator, training_args)
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
    trainer = NanoVLMTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator,
                             processing_class=processor, batch_sampler=sampler, optimizers=(optimizer, None))
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    # each process collated its own batches: the run's count is the sum
    skipped_train = int(trainer.accelerator.reduce(torch.tensor([collator.skipped_rows]), reduction="sum").item())
    folder = output_dir / "model"
    save_and_push(model, processor, folder, args.push_to_hub)  # every process takes part (FSDP gathers weights)
    if not trainer.is_world_process_zero():
        return {}  # evaluating and reloading happen once, on the main process

    metrics, items, skipped_eval = evaluate(model, processor, collator, held_out, settings, args)
    metrics.update(train_seconds=round(train_seconds, 1), skipped_train_rows=skipped_train,
                   train_samples=int(trainer.state.global_step * settings["batch_size"] * training_args.world_size),
                   final_loss=last_loss(trainer.state.log_history))
    if args.skip_bad_rows:
        examples = (collator.skipped_examples + skipped_eval)[:3]
        print(f"skipped bad rows: {skipped_train} in training, {len(skipped_eval)} held out"
              + (f"; e.g. {examples}" if examples else ""))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png", f"nanoVLM fine-tuned on {args.dataset}")
    return reload_and_compare(model, processor, metrics, folder, items[0], settings["max_new_tokens"], output_dir)


def evaluate(model, processor, collator, held_out, settings: dict, args) -> tuple[dict, list, list[str]]:
    """Exact match of greedy answers on the held-out rows: (metrics, the usable rows, why the others were skipped)."""
    items, skipped_eval = evaluation_rows(processor, collator, held_out)
    prompts, images, references = zip(*items)
    started = time.perf_counter()
    answers = generate_answers(model, processor, images, prompts, settings["max_new_tokens"], batch_size=8)

    def norm(text):
        return " ".join(text.lower().split()).rstrip(".")

    metrics = {
        "task": "dataset",
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "exact_match": sum(norm(a) == norm(r) for a, r in zip(answers, references)) / len(references),
        "digit_accuracy": None,  # the built-in task's metrics; not defined for an arbitrary dataset
        "quadrant_accuracy": None,
        "eval_samples": len(references),
        "eval_seconds": round(time.perf_counter() - started, 1),
        "skipped_eval_rows": len(skipped_eval),
        "seed": args.seed,
    }
    print(f"held-out exact match {metrics['exact_match']:.1%} on {len(references)} rows (greedy answers)")
    return metrics, items, skipped_eval


def reload_and_compare(model, processor, metrics: dict, folder: Path, item, max_new_tokens: int,
                       output_dir: Path) -> dict:
    """Reload the saved folder through the Auto classes, answer one held-out row, check it answers as the trained
    model did, and write metrics.json again with the answer."""
    prompt, row_images, reference = item
    before = generate_answers(model, processor, [row_images], [prompt], max_new_tokens)[0]
    reloaded, reloaded_processor = load_saved(folder)
    answer = generate_answers(reloaded, reloaded_processor, [row_images], [prompt], max_new_tokens)[0]
    print(f"reloaded {folder} through AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True)")
    print(f"Q: {prompt!r}\nA: {answer}    (reference: {reference})")
    metrics["reloaded_answer"] = answer
    metrics["reloaded_answer_matches"] = answer == before  # the saved folder answers as the trained model did
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
