"""NanoVLMCollator: dataset rows -> a training batch whose labels cover only the assistant's answers."""

from __future__ import annotations

import torch

from .image_processing_nanovlm import ImageInputError
from .processing_nanovlm import IMAGE_TOKEN

IGNORE_INDEX = -100  # what the LM loss skips
PLAN_KEY = "__plan__"  # reserved row key: the batch's plan overrides, drawn by the sampler (see processing/rows.py)
IMAGE_COLUMNS = ("images", "image")


class NanoVLMCollator:
    r"""Turns rows into the model's batch: input_ids, attention_mask, labels and the image inputs.

    A row is a dict with images under "images" (a list) or "image" (one), and either
      - "messages": a chat, a list of {"role", "content"}, content a string or a list of {"type": "image"} /
        {"type": "text", "text": ...} parts (an image part may carry the image itself under "image" when the row
        has no image column); each image part or `<image>` in a string is one image, in order; or
      - "prompt" and "answer" strings: one user turn and one assistant turn; the prompt gets one `<image>` per
        image in front when it has none.
    Other keys are ignored, except the reserved `"__plan__"`: plan overrides for the batch (e.g.
    `{"max_image_tokens": 64}`, drawn per batch by `BucketBatchSampler(..., budgets=...)` and put in the rows by
    `PlannedRows`), applied on top of `plan_overrides`. Text is rendered with the processor's chat template.

    `labels` are -100 everywhere except the tokens of every assistant answer, the closing `<|im_end|>` included
    (so the model learns to stop) and the newline after it excluded. Text is padded on the right; images are never
    padded. `max_length` truncates on the right (the processor refuses to cut through an image); a row whose
    answer is truncated away entirely is an error. Bad rows raise ValueError naming the row's place in the batch.
    """

    def __init__(self, processor, max_length: int | None = None, plan_overrides: dict | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.plan_overrides = dict(plan_overrides or {})
        self.image_token_id = processor.image_token_id
        # The token that closes a turn: ChatML's <|im_end|> (the default template) even where the tokenizer's eos is
        # another token, as in base (non-instruct) SmolLM2 checkpoints.
        has_chatml_end = "<|im_end|>" in self.tokenizer.get_vocab()
        self.end_of_turn = "<|im_end|>" if has_chatml_end else self.tokenizer.eos_token

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts, images, answer_spans = [], [], []
        for index, row in enumerate(rows):
            messages, row_images = self.conversation(row, index)
            text, spans = self.render(messages, index)
            if text.count(IMAGE_TOKEN) != len(row_images):
                raise ValueError(
                    f"row {index}: the text has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders "
                    f"but the row has {len(row_images)} images"
                )
            texts.append(text)
            images.append(row_images)
            answer_spans.append(spans)

        try:
            batch = self.processor(
                text=texts,
                images=images if any(images) else None,
                return_tensors="pt",
                padding=True,
                padding_side="right",
                truncation=self.max_length is not None,
                max_length=self.max_length,
                **{**self.plan_overrides, **self.batch_plan(rows)},
            )
        except ImageInputError as error:
            raise _name_the_row(error, images) from error
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for index, (text, spans) in enumerate(zip(texts, answer_spans)):
            labels[index] = self._row_labels(
                index, text, spans, batch["input_ids"][index], batch["attention_mask"][index]
            )
        return {**batch, "labels": labels}

    def batch_plan(self, rows: list[dict]) -> dict:
        """The `"__plan__"` the rows carry (plan overrides drawn by the sampler, e.g. `{"max_image_tokens": 64}`).

        It applies on top of the collator's own `plan_overrides`. Every row of a batch must carry the same one (the
        sampler draws it per batch); rows without it give `{}`.
        """
        plans = [row.get(PLAN_KEY) if isinstance(row, dict) else None for row in rows]
        first = plans[0]
        for index, plan in enumerate(plans):
            if plan != first:
                raise ValueError(
                    f"rows of one batch carry different {PLAN_KEY} values: row 0 has {first!r}, row {index} has "
                    f"{plan!r}; a batch is processed with one plan (BucketBatchSampler draws one per batch)"
                )
        if first is None:
            return {}
        if not isinstance(first, dict):
            raise ValueError(
                f"{PLAN_KEY} must be a dict of plan settings such as {{'max_image_tokens': 64}}, got {first!r}"
            )
        valid = getattr(self.processor.image_processor, "plan_fields", None)
        unknown = sorted(set(first) - set(valid)) if valid is not None else []
        if unknown:
            raise ValueError(f"{PLAN_KEY} has unknown plan setting(s) {unknown}; valid: {list(valid)}")
        return dict(first)

    # --- rows -> chat ------------------------------------------------------------------------------------

    def conversation(self, row: dict, index: int = 0) -> tuple[list[dict], list]:
        """The row as chat messages plus its images, in placeholder order."""
        if not isinstance(row, dict):
            raise ValueError(f"row {index}: expected a dict, got {type(row).__name__}")
        images = self._row_images(row, index)
        if "messages" in row:
            messages = row["messages"]
            self._check_messages(messages, index)
            if not images:  # images may travel inside the image parts instead of a column
                images = [
                    part["image"]
                    for message in messages
                    if isinstance(message["content"], list)
                    for part in message["content"]
                    if part["type"] == "image" and part.get("image") is not None
                ]
            return messages, images
        if "prompt" in row and "answer" in row:
            prompt, answer = row["prompt"], row["answer"]
            if not isinstance(prompt, str) or not isinstance(answer, str) or not answer:
                raise ValueError(f"row {index}: 'prompt' must be a string and 'answer' a non-empty string")
            if IMAGE_TOKEN not in prompt:
                prompt = IMAGE_TOKEN * len(images) + prompt
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], images
        raise ValueError(
            f"row {index}: needs 'messages' or 'prompt' + 'answer' (and an image column), got keys {sorted(row)}"
        )

    def _row_images(self, row: dict, index: int) -> list:
        present = [name for name in IMAGE_COLUMNS if row.get(name) is not None]
        if len(present) > 1:
            raise ValueError(f"row {index}: has both 'images' and 'image'; use one")
        if not present:
            return []
        images = row[present[0]]
        return list(images) if isinstance(images, (list, tuple)) else [images]

    @staticmethod
    def _check_messages(messages, index: int):
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"row {index}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise ValueError(f"row {index}: message {turn} must be a dict with a 'role' string and a 'content'")
            content = message["content"]
            if isinstance(content, str):
                continue
            if not isinstance(content, (list, tuple)):
                raise ValueError(f"row {index}: message {turn} content must be a string or a list of parts")
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("image", "text"):
                    raise ValueError(
                        f"row {index}: message {turn} has a part that is not {{'type': 'image' | 'text'}}: {part!r}"
                    )
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"row {index}: message {turn} has a text part without a 'text' string")
        if messages[0]["role"] == "assistant":
            raise ValueError(f"row {index}: the conversation starts with an assistant turn; it needs a prompt first")
        if not any(message["role"] == "assistant" and message["content"] for message in messages):
            raise ValueError(f"row {index}: no non-empty assistant turn, so nothing to learn from")

    # --- chat -> text and answer spans -------------------------------------------------------------------

    def render(self, messages: list[dict], index: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """The chat as text, and the character spans of the assistant answers (each up to its end-of-turn token).

        An answer starts where the template's generation prompt for it ends, which holds for any template that
        renders a conversation as the concatenation of its turns (ChatML does).
        """
        text = self._template(messages, add_generation_prompt=False)
        spans = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._template(messages[:turn], add_generation_prompt=True)
            through = self._template(messages[: turn + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"row {index}: the chat template does not render turns as a plain concatenation, "
                    "so the assistant answer cannot be located"
                )
            end = through.rfind(self.end_of_turn, len(before))
            spans.append((len(before), end + len(self.end_of_turn) if end >= 0 else len(through)))
        return text, spans

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def text_length(self, row: dict) -> int:
        """Text tokens of a row, image tokens excluded: the sampler adds those from the image plan.

        The row's image column is not needed (and not decoded); placeholders count for nothing either way.
        """
        messages, _ = self.conversation(row)
        text = self._template(messages, add_generation_prompt=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return sum(1 for token in ids if token != self.image_token_id)

    # --- labels --------------------------------------------------------------------------------------------

    def _row_labels(self, index, text, spans, input_ids, attention_mask) -> torch.Tensor:
        """Labels for one row of the processor's output, from the answer spans of its unexpanded text.

        The text is tokenized here once more without expanding `<image>` (a special token, so the text around it
        tokenizes the same either way); its non-image tokens are, in order, the non-image tokens of the row.
        """
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        text_tokens = [
            (token, any(start <= offset < end for start, end in spans))
            for token, (offset, _) in zip(encoding["input_ids"], encoding["offset_mapping"])
            if token != self.image_token_id
        ]
        positions = ((input_ids != self.image_token_id) & (attention_mask == 1)).nonzero().flatten()
        kept = text_tokens[: len(positions)]  # truncation keeps a prefix
        if [token for token, _ in kept] != input_ids[positions].tolist():
            raise RuntimeError(f"row {index}: the processor tokenized the text differently from the collator")
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for position, (token, in_answer) in zip(positions.tolist(), kept):
            if in_answer:
                labels[position] = token
        if not (labels != IGNORE_INDEX).any():
            raise ValueError(
                f"row {index}: max_length={self.max_length} truncates away the whole answer "
                f"({len(input_ids)} tokens kept); raise max_length"
            )
        return labels


def _name_the_row(error: ImageInputError, images: list[list]) -> ImageInputError:
    """The processor counts images across the batch; say which row, and which of its images, failed."""
    if error.image_index is None:
        return error
    cause = error
    while isinstance(cause.__cause__, ImageInputError):  # the innermost message says what is wrong
        cause = cause.__cause__
    position = error.image_index
    for row, row_images in enumerate(images):
        if position < len(row_images):
            return ImageInputError(f"row {row}, image {position} of the row: {cause}", image_index=error.image_index)
        position -= len(row_images)
    return error


__all__ = ["NanoVLMCollator", "IGNORE_INDEX"]
