"""What both recipes share (`digits_recipe.py`, `finetune_dataset.py`): Trainer arguments, one optimizer group per
model part, greedy answers, saving (and pushing) the model folder, reloading it as a Hub user would, the loss plot.
"""

from __future__ import annotations

from pathlib import Path

import torch


def training_arguments(output_dir: Path, max_steps: int | None, batch_size: int, learning_rate: float,
                       warmup_ratio: float, seed: int, logging_steps: int = 10):
    """`TrainingArguments` for a short CPU-friendly run: cosine schedule, no checkpoints, no reporting."""
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
        logging_steps=logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the collator reads the image columns
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def _part(name: str) -> str:
    """A parameter name as `vision_tower.*`, `connector.*` or `language_model.*` (the LM head counts as the LM's)."""
    return "language_model." + name if name.startswith("lm_head.") else name.removeprefix("model.")


def make_optimizer(model, learning_rates: dict[str, float], weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with one parameter group per part (vision tower, connector, language model) and its own rate."""
    groups = []
    for prefix, lr in learning_rates.items():
        params = [p for name, p in model.named_parameters() if _part(name).startswith(prefix) and p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
    return torch.optim.AdamW(groups, betas=(0.9, 0.98))


def chat_prompt(processor, question: str) -> str:
    """The generation prompt for one image and `question`."""
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


def set_generation_tokens(model, tokenizer) -> None:
    """Stop at the end of the assistant turn, pad with the tokenizer's pad token, never emit `<image>` or rows past
    the tokenizer."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    has_end_of_turn = isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id
    eos = end_of_turn if has_end_of_turn else tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.suppress_undecodable_tokens(len(tokenizer))


def save_and_push(model, processor, folder: Path, push_to_hub: str | None, metrics: dict | None = None) -> None:
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


def load_saved(folder: Path):
    """(model, processor) loaded from the saved folder as a Hub user would: Auto classes, remote code."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    return model, processor


def reload_and_ask(folder: Path, image, question: str, max_new_tokens: int) -> str:
    """Load the saved folder as a Hub user would (Auto classes, remote code) and answer one question."""
    model, processor = load_saved(folder)
    return generate_answers(model, processor, [[image]], [chat_prompt(processor, question)], max_new_tokens)[0]


def last_loss(log_history) -> float | None:
    """The last logged training loss."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return float(losses[-1]) if losses else None


def plot_loss_curve(log_history: list[dict], path: Path, title: str, side_schedule=None) -> None:
    """The training loss against the step; `side_schedule` [(step, largest canvas side), ...] on a second axis."""
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
