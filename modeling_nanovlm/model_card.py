"""The model card (README.md with Hub metadata) written next to a saved nanoVLM model."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

USAGE = """\
```python
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image

model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=[Image.open("photo.jpg")], return_tensors="pt")
answer = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(answer[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Or with a pipeline: `pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)`.
"""


def _connector_summary(config) -> str:
    """One line: the connector mode and the settings that shape its tokens."""
    if config.connector != "shuffle":
        return f"{config.connector}, {config.perceiver_latents} latents"
    parts = [f"shuffle factors {list(config.shuffle_factors)}"]
    if config.shared_cell_encoder:
        parts.append("shared cell encoder")
    if config.cell_context_kernel:
        parts.append(f"cell context {config.cell_context_kernel}x{config.cell_context_kernel}")
    if config.token_context_kernel:
        parts.append(f"token context {config.token_context_kernel}x{config.token_context_kernel}")
    if config.image_token_positions:
        parts.append("2-D token positions")
    return ", ".join(["shuffle", *parts])


def _table(rows: dict) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| `{key}` | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def _percent(value) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else "–"


def budget_table(curve: dict) -> str:
    """Markdown table of a budget curve: {"144": {"digit_accuracy", "quadrant_accuracy", "mean_image_tokens"}, ...}.

    Accuracy columns are the curve's `*_accuracy` entries (held-out, 0-1), in the order they first appear.
    """
    columns = []
    for point in curve.values():
        columns += [key for key in point if key.endswith("_accuracy") and key not in columns]
    header = ["budget (`max_image_tokens`)", *(key.replace("_", " ") for key in columns), "mean image tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for budget in sorted(curve, key=lambda b: -int(b)):
        point = curve[budget]
        tokens = point.get("mean_image_tokens")
        cells = [str(budget), *(_percent(point.get(key)) for key in columns),
                 f"{tokens:.1f}" if isinstance(tokens, (int, float)) else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nOne model, the budget lowered per call: `processor(text=..., images=..., max_image_tokens=36)`."
    )
    return "\n".join(lines)


def render_model_card(config, repo: str, image_processor=None, metrics: dict | None = None) -> ModelCard:
    """A model card for `config`; the budget section comes from the image processor when given, and a
    `metrics["budget_curve"]` (held-out accuracy per budget, as the main job measures it) becomes a table."""
    vision, text = config.vision_config, config.text_config
    base_models = list(getattr(config, "base_models", None) or [])
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["nanovlm", "vision-language", "dinov3", "dynamic-resolution", "custom_code"],
        base_model=base_models or None,
    )
    architecture = _table(
        {
            "vision tower": f"DINOv3 ViT, {vision.num_hidden_layers} layers x {vision.hidden_size}, "
            f"patch {vision.patch_size}",
            "connector": _connector_summary(config),
            "language model": f"{text.model_type}, {text.num_hidden_layers} layers x {text.hidden_size}, "
            f"vocab {text.vocab_size}",
            "image token id": config.image_token_id,
        }
    )
    if image_processor is not None:
        budget = _table({name: getattr(image_processor, name) for name in image_processor.plan_fields})
        budget += (
            "\n\nThe budget is stored in `processor_config.json` and can be changed per call: "
            "`processor(text=..., images=..., max_image_tokens=256)`."
        )
    else:
        budget = "See `processor_config.json` (`max_image_tokens`, `max_image_size`, `shuffle_factors`)."
    sections = [
        f"# {repo.split('/')[-1]}",
        "A nanoVLM vision-language model: a DINOv3 vision tower sees each image at its own resolution and "
        "aspect ratio, a connector turns its patch grid into at most `max_image_tokens` tokens, and a "
        "Llama-style language model answers.",
        "## Usage\n\n" + USAGE.format(repo=repo),
        "## Architecture\n\n" + architecture,
        "## Image-token budget\n\n" + budget,
    ]
    if base_models:
        sections.append("## Base models\n\n" + "\n".join(f"- `{name}`" for name in base_models))
    metrics = dict(metrics or {})
    curve = metrics.pop("budget_curve", None)
    if metrics:
        sections.append("## Training metrics\n\n" + _table(metrics))
    if curve:
        sections.append("## Accuracy at each image-token budget\n\n" + budget_table(curve))
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)
