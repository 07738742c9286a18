"""NanoVLMProcessor: the image processor's plan + a tokenizer, with `<image>` expanded to the planned tokens."""

from __future__ import annotations

from transformers import AutoTokenizer
from transformers.processing_utils import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from .image_processing_nanovlm import ImageInputError, NanoVLMImageProcessor

IMAGE_TOKEN = "<image>"

# ChatML, as SmolLM2 uses. Content may be a string or a list of {"type": "image"} / {"type": "text"} parts;
# each image part becomes one <image> placeholder, expanded by the processor.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ImageTextMismatchError(ValueError):
    """The images and the `<image>` placeholders in the text do not line up."""


class NanoVLMProcessor(ProcessorMixin):
    r"""Image processor + tokenizer. Each `<image>` in the text becomes exactly as many `<image>` tokens as
    that image's plan gives (no wrapper tokens), so the model can place one feature per token.

    `processor(text=..., images=..., max_image_tokens=N)` overrides the budget for one call; any other
    plan field (`max_image_size`, ...) can be overridden the same way.
    """

    image_token = IMAGE_TOKEN

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if IMAGE_TOKEN not in self.tokenizer.get_vocab():
            raise ValueError(
                f"the tokenizer has no {IMAGE_TOKEN} token; build the processor with NanoVLMProcessor.from_backbones "
                "or add it with tokenizer.add_special_tokens({'additional_special_tokens': ['<image>']})"
            )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_backbones(cls, text_model: str, tokenizer=None, **image_processor_kwargs):
        """A processor for a pretrained LM: its tokenizer gains the `<image>` token (and a pad token if it lacks one)."""
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(text_model)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(image_processor=NanoVLMImageProcessor(**image_processor_kwargs), tokenizer=tokenizer)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the image processor as this module's own class. Through AutoImageProcessor (the default) the
        auto_map written for Hub export counts as remote code, so a local `from_pretrained` would demand
        `trust_remote_code`, and remote loading would pair the processor with a second copy of the module."""
        kwargs.pop("trust_remote_code", None)
        image_processor = NanoVLMImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]

    def _images_per_sample(self, text: list[str], images) -> list[list]:
        """Images grouped per sample, checked against the `<image>` count of each sample."""
        counts = [sample.count(IMAGE_TOKEN) for sample in text]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(group, (list, tuple)) for group in images):
            if len(images) != len(text):
                raise ImageTextMismatchError(f"got image lists for {len(images)} samples but {len(text)} texts")
            grouped = [list(group) for group in images]
        else:
            if len(images) != sum(counts):
                raise ImageTextMismatchError(
                    f"the text holds {sum(counts)} {IMAGE_TOKEN} placeholders (per sample: {counts}) "
                    f"but {len(images)} images were given"
                )
            grouped, start = [], 0
            for count in counts:
                grouped.append(list(images[start : start + count]))
                start += count
        for index, (count, group) in enumerate(zip(counts, grouped)):
            if count != len(group):
                raise ImageTextMismatchError(
                    f"sample {index} has {count} {IMAGE_TOKEN} placeholders but {len(group)} images"
                )
        return grouped

    def __call__(
        self,
        text=None,
        images=None,
        return_tensors=None,
        padding=True,
        padding_side="left",
        truncation=False,
        max_length=None,
        add_special_tokens=False,
        videos=None,
        audio=None,
        **plan_overrides,
    ) -> BatchFeature:
        """Tokenize `text` with each `<image>` expanded to its planned tokens, and process `images`.

        `text` is a string or a list of strings; `images` a flat list (in placeholder order) or one list
        per sample. Plan fields (`max_image_tokens`, `max_image_size`, ...) may be overridden per call.
        Padding is on the left by default, as generation wants; training collators pad on the right.
        """
        if videos is not None or audio is not None:
            raise ValueError("nanoVLM takes images and text only (no videos or audio)")
        if text is None:
            if images is None:
                raise ValueError("give text, images, or both")
            return self.image_processor(images, return_tensors=return_tensors, **plan_overrides)
        single = isinstance(text, str)
        text = [text] if single else list(text)
        if not all(isinstance(sample, str) for sample in text):
            raise TypeError("text must be a string or a list of strings")
        if single and images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        grouped = self._images_per_sample(text, images)

        flat = [image for group in grouped for image in group]
        image_inputs = {}
        expanded = text
        if flat:
            try:
                image_inputs = self.image_processor(flat, return_tensors=return_tensors, **plan_overrides)
            except ValueError as error:  # ImageInputError; remote code loads the image processor's own copy of it
                if not hasattr(error, "image_index"):
                    raise
                sample = _sample_of_image(error.image_index, grouped)
                raise ImageInputError(f"sample {sample}, {error}", image_index=error.image_index) from error
            token_counts = iter(int(h) * int(w) for h, w in image_inputs["image_token_hw"].tolist())
            expanded = [_expand_placeholders(sample, token_counts) for sample in text]

        encoding = self.tokenizer(
            expanded,
            padding=padding,
            padding_side=padding_side,
            truncation=truncation,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
            return_tensors=return_tensors,
        )
        self._check_image_tokens(encoding["input_ids"], [sample.count(IMAGE_TOKEN) for sample in expanded])
        return BatchFeature(data={**encoding, **image_inputs}, tensor_type=return_tensors)

    def _check_image_tokens(self, input_ids, expected: list[int]):
        """Truncation must never cut through an image: every planned image token must survive."""
        for index, (ids, count) in enumerate(zip(input_ids, expected)):
            ids = ids.tolist() if hasattr(ids, "tolist") else ids
            found = sum(1 for token in ids if token == self.image_token_id)
            if found != count:
                raise ValueError(
                    f"sample {index}: the images need {count} image tokens but {found} remain after tokenization; "
                    "truncation (max_length) cut through an image: raise max_length or lower max_image_tokens"
                )

    def num_image_tokens(self, height: int, width: int, **plan_overrides) -> int:
        return self.image_processor.num_image_tokens(height, width, **plan_overrides)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", *self.image_processor.model_input_names]


def _expand_placeholders(sample: str, token_counts) -> str:
    pieces = sample.split(IMAGE_TOKEN)
    out = [pieces[0]]
    for piece in pieces[1:]:
        out.append(IMAGE_TOKEN * next(token_counts))
        out.append(piece)
    return "".join(out)


def _sample_of_image(image_index: int | None, grouped: list[list]) -> int | None:
    """Which sample the image at `image_index` (counted across the batch) belongs to."""
    if image_index is None:
        return None
    for sample, group in enumerate(grouped):
        if image_index < len(group):
            return sample
        image_index -= len(group)
    return None


__all__ = ["NanoVLMProcessor", "ImageTextMismatchError", "CHAT_TEMPLATE", "IMAGE_TOKEN"]
