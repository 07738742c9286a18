"""NanoVLMCollator: dataset rows -> a training batch whose labels cover only the assistant's answers."""

from __future__ import annotations

import logging

import torch
from transformers.feature_extraction_utils import BatchFeature

from ..chat_templates import GENERATION_MARK
from ..image_loading import ImageInputError
from ..processing_nanovlm import IMAGE_TOKEN
from .sizes import IMAGE_COLUMNS, INDEX_KEY, image_source

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what the LM loss skips
PLAN_KEY = "__plan__"  # reserved row key: the batch's plan overrides, drawn by the sampler (see rows.py)
SKIP_HINT = "pass skip_bad_rows=True to skip and count such rows instead"


class BadRowError(ValueError):
    """A row that cannot be trained on as it is: malformed, no answer, or an unreadable image."""


def row_name(row, position: int) -> str:
    """How errors name a row: by its dataset index (the reserved `__index__` key) when it has one, else its place in
    the batch."""
    if isinstance(row, dict) and row.get(INDEX_KEY) is not None:
        return f"dataset row {row[INDEX_KEY]}"
    return f"row {position}"


class NanoVLMCollator:
    r"""Turns rows into the model's batch: input_ids, attention_mask, labels and the image inputs.

    A row is a dict with images under "images" (a list) or "image" (one), and either
      - "texts": the Cauldron / FineVision schema, a list of turns `{"user": ..., "assistant": ..., ...}` (other
        keys, such as "source", are ignored); when no turn holds an `<image>` placeholder, the row's images go in
        front of the first user turn, in order; or
      - "messages": a chat, a list of {"role", "content"}, content a string or a list of {"type": "image"} /
        {"type": "text", "text": ...} parts (an image part may carry the image itself under "image" when the row
        has no image column); each image part or `<image>` in a string is one image, in order; or
      - "prompt" and "answer" strings: one user turn and one assistant turn; the prompt gets one `<image>` per
        image in front when it has none.
    Other keys are ignored, except two reserved ones: `"__index__"` (the row's dataset index) names the row in
    errors, and `"__plan__"` holds plan overrides for the batch (e.g. `{"max_image_tokens": 64}`, drawn per batch by
    `BucketBatchSampler(..., budgets=...)` and put in the rows by `PlannedRows`), applied on top of
    `plan_overrides`. Text is rendered with the processor's chat template.

    `labels` are -100 everywhere except the tokens of every assistant answer, the closing `<|im_end|>` included
    (so the model learns to stop) and the newline after it excluded: the tokens the processor's chat template marks
    with `{% generation %}...{% endgeneration %}`. Each row is rendered and tokenized once, in one
    `processor.apply_chat_template(..., return_assistant_tokens_mask=True)` call per batch. A processor whose chat
    template has no such marks (a template of your own, or a backbone's) is a `ValueError` at construction: wrap
    what the model should learn to say -- each assistant message's content and its end-of-turn token -- in them, as
    `processing.CHAT_TEMPLATE` does (`processor.chat_template = processing.CHAT_TEMPLATE` restores the default on a
    processor saved before the marks existed). Text is padded on the right; images are never padded. `max_length`
    truncates on the right (the processor refuses to cut through an image); a row whose answer is truncated away
    entirely is an error.

    Bad rows -- malformed, an empty answer, an image that cannot be read -- raise `BadRowError` (or the processor's
    `ImageInputError`) naming the row (`row_name`). With `skip_bad_rows=True` they are dropped from their batch
    instead, counted in `skipped_rows` (the first messages kept in `skipped_examples`) and logged; a batch whose
    rows are all bad is still an error. The count is per process: with DataLoader workers each worker collates in
    its own copy of the collator.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        plan_overrides: dict | None = None,
        skip_bad_rows: bool = False,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.plan_overrides = dict(plan_overrides or {})
        self.skip_bad_rows = skip_bad_rows
        self.skipped_rows = 0
        self.skipped_examples: list[str] = []  # the first few reasons, for the end-of-run report
        self._last_skip = None
        self.image_token_id = processor.image_token_id
        _marked_chat_template(processor)  # fail here, not at the first batch

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Rows -> one batch: `input_ids`, `attention_mask`, `labels` (answers only), the images' patches and plans."""
        prepared = []  # (row name, messages, images) of the rows kept
        for position, row in enumerate(rows):
            try:
                prepared.append(self._prepare(row, position))
            except BadRowError as error:
                self._skip_or_raise(error)
        plan_overrides = {**self.plan_overrides, **self.batch_plan(rows)}
        while True:
            if not prepared:
                raise BadRowError(
                    f"all {len(rows)} rows of this batch are bad, so there is nothing to train on "
                    f"({self.skipped_rows} rows skipped so far; the last because {self._last_skip})"
                )
            try:
                batch = self._encode(prepared, plan_overrides)
                break
            except ImageInputError as error:
                images = [row_images for _, _, row_images in prepared]
                bad, named = _name_the_row(error, images, [name for name, _, _ in prepared])
                if bad is None:  # not one row's image: nothing to skip
                    raise
                if not self.skip_bad_rows:
                    raise ImageInputError(f"{named} ({SKIP_HINT})", image_index=named.image_index) from error
                self._skip(str(named))
                del prepared[bad]  # and collate the others again: bad images are rare
        labels = self._labels(batch, [name for name, _, _ in prepared])
        return {**batch, "labels": labels}

    def _prepare(self, row: dict, position: int) -> tuple[str, list[dict], list]:
        """(name, messages, images) of one row; `BadRowError` if it cannot be trained on."""
        name = row_name(row, position)
        messages, row_images = self.conversation(row, position)
        placeholders = _count_placeholders(messages)
        if placeholders != len(row_images):
            raise BadRowError(
                f"{name}: the text has {placeholders} {IMAGE_TOKEN} placeholders "
                f"but the row has {len(row_images)} images"
            )
        return name, messages, row_images

    def _encode(self, prepared: list[tuple[str, list[dict], list]], plan_overrides: dict) -> BatchFeature:
        """The rows rendered, tokenized (right-padded, `<image>` expanded) and their images processed, in one call,
        with `assistant_masks` marking the tokens the chat template puts in `{% generation %}`."""
        batch = self.processor.apply_chat_template(
            [messages for _, messages, _ in prepared],
            chat_template=_marked_chat_template(self.processor),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            processor_kwargs={
                "images": [row_images for _, _, row_images in prepared],
                "padding": True,
                "padding_side": "right",
                "truncation": self.max_length is not None,
                "max_length": self.max_length,
                **plan_overrides,
            },
        )
        # Tensors only now: transformers builds the mask by walking the token offsets in Python, slow over tensors.
        return batch.convert_to_tensors("pt")

    def _labels(self, batch: BatchFeature, names: list[str]) -> torch.Tensor:
        """The input ids where the template marks the assistant's tokens (`assistant_masks`, popped), -100
        elsewhere. Image tokens never count, even in an assistant turn."""
        marked = batch.pop("assistant_masks").bool() & (batch["input_ids"] != self.image_token_id)
        for name, row_marked in zip(names, marked):
            if not row_marked.any():
                raise ValueError(
                    f"{name}: max_length={self.max_length} truncates away the whole answer "
                    f"({len(row_marked)} tokens kept); raise max_length"
                )
        return batch["input_ids"].masked_fill(~marked, IGNORE_INDEX)

    def _skip_or_raise(self, error: BadRowError):
        if not self.skip_bad_rows:
            raise BadRowError(f"{error} ({SKIP_HINT})") from error
        self._skip(str(error))

    def _skip(self, reason: str):
        self.skipped_rows += 1
        self._last_skip = reason
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(reason)
        if self.skipped_rows <= 10 or self.skipped_rows & (self.skipped_rows - 1) == 0:  # then at powers of two
            logger.warning("skipped a bad row (%d so far): %s", self.skipped_rows, reason)

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
        """The row as chat messages plus its images, in placeholder order. `index`: its place in the batch."""
        name = row_name(row, index)
        if not isinstance(row, dict):
            raise BadRowError(f"{name}: expected a dict, got {type(row).__name__}")
        images = self._row_images(row, name)
        if "texts" in row:
            return self._cauldron_messages(row["texts"], len(images), name), images
        if "messages" in row:
            messages = row["messages"]
            self._check_messages(messages, name)
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
            if not isinstance(prompt, str) or not isinstance(answer, str) or not answer.strip():
                raise BadRowError(f"{name}: 'prompt' must be a string and 'answer' a non-empty string")
            if IMAGE_TOKEN not in prompt:
                prompt = IMAGE_TOKEN * len(images) + prompt
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], images
        raise BadRowError(
            f"{name}: needs 'messages' or 'prompt' + 'answer', or the Cauldron's 'texts' (and an image column), "
            f"got keys {sorted(row)}"
        )

    @staticmethod
    def _cauldron_messages(turns, num_images: int, name: str) -> list[dict]:
        """Cauldron / FineVision turns as chat messages, the images in front of the first user turn when no turn
        places them with `<image>`."""
        if not isinstance(turns, (list, tuple)) or not turns:
            raise BadRowError(f"{name}: 'texts' must be a non-empty list of {{'user', 'assistant'}} turns")
        messages = []
        for number, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("user"), str):
                raise BadRowError(
                    f"{name}: turn {number} of 'texts' must be a dict with a 'user' string, got {turn!r:.200}"
                )
            answer = turn.get("assistant")
            if not isinstance(answer, str) or not answer.strip():
                raise BadRowError(
                    f"{name}: turn {number} of 'texts' has an empty answer ('assistant': {answer!r:.50})"
                )
            messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": answer}]
        if num_images and not any(IMAGE_TOKEN in message["content"] for message in messages):
            messages[0] = {"role": "user", "content": IMAGE_TOKEN * num_images + messages[0]["content"]}
        return messages

    def _row_images(self, row: dict, name: str) -> list:
        present = [column for column in IMAGE_COLUMNS if row.get(column) is not None]
        if len(present) > 1:
            raise BadRowError(f"{name}: has both 'images' and 'image'; use one")
        if not present:
            return []
        images = row[present[0]]
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        for position, image in enumerate(images):
            try:
                images[position] = image_source(image)  # an undecoded `datasets` image: its bytes or path
            except ImageInputError as error:
                raise BadRowError(f"{name}, image {position} of the row: {error}") from error
        return images

    @staticmethod
    def _check_messages(messages, name: str):
        if not isinstance(messages, (list, tuple)) or not messages:
            raise BadRowError(f"{name}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise BadRowError(f"{name}: message {turn} must be a dict with a 'role' string and a 'content'")
            content = message["content"]
            if isinstance(content, str):
                continue
            if not isinstance(content, (list, tuple)):
                raise BadRowError(f"{name}: message {turn} content must be a string or a list of parts")
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("image", "text"):
                    raise BadRowError(
                        f"{name}: message {turn} has a part that is not {{'type': 'image' | 'text'}}: {part!r}"
                    )
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise BadRowError(f"{name}: message {turn} has a text part without a 'text' string")
        if messages[0]["role"] == "assistant":
            raise BadRowError(f"{name}: the conversation starts with an assistant turn; it needs a prompt first")
        if not any(message["role"] == "assistant" and message["content"] for message in messages):
            raise BadRowError(f"{name}: no non-empty assistant turn, so nothing to learn from")

    # --- text lengths --------------------------------------------------------------------------------------

    def text_length(self, row: dict) -> int:
        """Text tokens of a row, image tokens excluded: the sampler adds those from the image plan.

        The row's image column is not needed (and not decoded); placeholders count for nothing either way.
        With `skip_bad_rows`, a bad row counts 0 here (the collator skips and counts it when its batch comes).
        """
        try:
            messages, _ = self.conversation(row)
        except BadRowError:
            if self.skip_bad_rows:
                return 0
            raise
        text = self.processor.apply_chat_template(list(messages), tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return sum(1 for token in ids if token != self.image_token_id)


def _marked_chat_template(processor) -> str:
    """The processor's chat template, checked to mark the assistant's tokens with `{% generation %}`: without the
    marks, `return_assistant_tokens_mask` marks nothing and the collator would have nothing to train on."""
    template = processor.chat_template
    if isinstance(template, dict):  # named templates: transformers renders "default"
        template = template.get("default")
    if not isinstance(template, str) or not GENERATION_MARK.search(template):
        raise ValueError(
            "the processor's chat template does not mark the assistant's answers with {% generation %}..."
            "{% endgeneration %}, so NanoVLMCollator cannot tell which tokens to train on. Wrap each assistant "
            "message's content and its end-of-turn token in them, as processing.CHAT_TEMPLATE does; on a processor "
            "saved before the marks existed, `processor.chat_template = processing.CHAT_TEMPLATE` restores the default"
        )
    return template


def _count_placeholders(messages: list[dict]) -> int:
    """The `<image>` placeholders a chat renders to: one per image part, plus those written in its text."""
    count = 0
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            count += 1 if part["type"] == "image" else part["text"].count(IMAGE_TOKEN)
    return count


def _name_the_row(error: ImageInputError, images: list[list], names: list[str]) -> tuple[int | None, ImageInputError]:
    """The processor counts images across the batch; say which row (its position among `images`, and its name) and
    which of its images failed."""
    if error.image_index is None:
        return None, error
    cause = error
    while isinstance(cause.__cause__, ImageInputError):  # the innermost message says what is wrong
        cause = cause.__cause__
    position = error.image_index
    for row, row_images in enumerate(images):
        if position < len(row_images):
            message = f"{names[row]}, image {position} of the row: {cause}"
            named = ImageInputError(message, image_index=error.image_index)
            return row, named
        position -= len(row_images)
    return None, error


__all__ = ["NanoVLMCollator", "BadRowError", "row_name", "IGNORE_INDEX"]
