"""NanoVLMProcessor: the image processor's plan + a tokenizer, with `<image>` expanded to the planned tokens."""

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.models.auto.tokenization_auto import get_tokenizer_config, tokenizer_class_from_name
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TextInput

from .chat_templates import CHAT_TEMPLATE, chat_template_for, check_chat_template
from .image_loading import ImageInputError
from .image_processing_nanovlm import MODEL_SETTINGS, NanoVLMImageProcessor

IMAGE_TOKEN = "<image>"


class ImageTextMismatchError(ValueError):
    """The images and the `<image>` placeholders in the text do not line up."""

    def __init__(self, detail: str):
        # transformers' own wording follows ours, for clients that match on it
        super().__init__(
            f"{detail} (the number of {IMAGE_TOKEN} tokens in the prompts should be the same as the number of images "
            "passed)"
        )


class NanoVLMImagesKwargs(ImagesKwargs, total=False):
    """The image plan's fields a call may change (`processor(..., max_image_tokens=256)`), and those the model's
    weights fix (connector, factors, latents, patch size), declared so that passing one per call reaches the image
    processor and is refused there with the way to build a processor for that model."""

    max_image_tokens: int | None
    max_image_tokens_per_sample: int | None
    max_image_size: int | None
    snap_sizes: list[int] | tuple[int, ...] | None
    snap_aspect_ratios: list[float] | tuple[float, ...] | None
    shuffle_factors: list[int] | tuple[int, ...] | None
    connector: str | None
    perceiver_latents: int | None
    patch_size: int | None


class NanoVLMProcessorKwargs(ProcessingKwargs, total=False):
    """The processor's typed kwargs: the plan fields go to the image processor, everything else to the tokenizer."""
    images_kwargs: NanoVLMImagesKwargs


class NanoVLMProcessor(ProcessorMixin):
    r"""Image processor + tokenizer. Each `<image>` in the text becomes exactly as many `<image>` tokens as
    that image's plan gives (no wrapper tokens), so the model can place one feature per token.

    Keyword arguments follow transformers' typed processor kwargs (`NanoVLMProcessorKwargs`): tokenizer
    arguments (`padding`, `pad_to_multiple_of`, `truncation`, `max_length`, `return_offsets_mapping`, ...)
    reach the tokenizer, plan fields (`max_image_tokens`, `max_image_size`, `shuffle_factors`, ...) the image
    processor, either flat (`processor(text=..., images=..., max_image_tokens=N)` overrides the budget for one
    call) or grouped (`text_kwargs={...}`, `images_kwargs={...}`).
    """

    image_token = IMAGE_TOKEN
    valid_processor_kwargs = NanoVLMProcessorKwargs
    # Defaults, lowest priority in `_merge_kwargs`. Left padding suits generation; training collators ask
    # for the right. The chat template writes every special token itself, so the tokenizer adds none.
    text_kwargs = {"padding": True, "padding_side": "left", "truncation": False, "add_special_tokens": False}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            # the LM's own template with image parts (and its rendering checked); CHAT_TEMPLATE when it has none
            chat_template = chat_template_for(tokenizer)
            if chat_template != CHAT_TEMPLATE:
                check_chat_template(tokenizer, chat_template)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if IMAGE_TOKEN not in self.tokenizer.get_vocab():
            raise ValueError(
                f"the tokenizer has no {IMAGE_TOKEN} token; build the processor with NanoVLMProcessor.from_backbones "
                "or add it with tokenizer.add_special_tokens({'additional_special_tokens': ['<image>']})"
            )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_backbones(
        cls, text_model: str, tokenizer=None, model_config=None, gguf_file: str | None = None, chat_template=None,
        **image_processor_kwargs,
    ) -> "NanoVLMProcessor":
        """A processor for a pretrained LM: its tokenizer gains the `<image>` token (and a pad token if it lacks one).

        `text_model` is a Hub id, a folder, a `*.gguf` file, or a folder with `gguf_file=` naming the file in it (the
        tokenizer and its chat template then come from the file; needs the `gguf` package). The chat template is the
        LM's own, taking image parts and marking answers with `{% generation %}` (`chat_template_for`), or
        `chat_template` when given.

        With `model_config` (the model's, e.g. `model.config`) the image processor takes the settings the model fixes
        from it (`NanoVLMImageProcessor.from_model_config`), and `image_processor_kwargs` give the rest:

            model = NanoVLMForConditionalGeneration.from_backbones(vision_id, text_id, shuffle_factors=[2, 4])
            processor = NanoVLMProcessor.from_backbones(text_id, model_config=model.config, max_image_tokens=256)
        """
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(text_model, gguf_file)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model_config is None:
            image_processor = NanoVLMImageProcessor(**image_processor_kwargs)
        else:
            image_processor = NanoVLMImageProcessor.from_model_config(model_config, **image_processor_kwargs)
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
        if model_config is not None:
            processor.check_model_config(model_config)
        return processor

    def check_model_config(self, config) -> None:
        """A `ValueError` when this processor's output would not fit `config`'s model: another `<image>` token id, or
        image plans the model refuses (`NanoVLMImageProcessor.check_model_config`)."""
        if self.image_token_id != config.image_token_id:
            raise ValueError(
                f"the tokenizer's {IMAGE_TOKEN} token is id {self.image_token_id} but the model's image_token_id is "
                f"{config.image_token_id}: give the model and the processor the same tokenizer (from_backbones(..., "
                "tokenizer=processor.tokenizer))"
            )
        self.image_processor.check_model_config(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "NanoVLMProcessor":
        """Load the sub-processors here, then the rest as transformers does; it never asks "run the custom code?".

        - the image processor as this module's own class: through AutoImageProcessor (transformers' default) the
          auto_map written for Hub export counts as remote code, so a local `from_pretrained` would demand
          `trust_remote_code`, and remote loading would pair the processor with a second copy of the module;
        - the tokenizer as the class its tokenizer_config.json names: AutoTokenizer would read the folder's
          config.json first, whose auto_map makes it ask "Do you wish to run the custom code? [y/N]".

        A sub-processor passed in is used as it is (transformers >= 5.25 takes them from `kwargs`;
        `_get_arguments_from_pretrained` hands them on for 5.24).
        """
        hub_kwargs = {key: value for key, value in kwargs.items()
                      if key not in ("trust_remote_code", "image_processor", "tokenizer", "return_unused_kwargs")}
        if kwargs.get("image_processor") is None:
            kwargs["image_processor"] = NanoVLMImageProcessor.from_pretrained(
                pretrained_model_name_or_path, **hub_kwargs
            )
        if kwargs.get("tokenizer") is None:
            named = get_tokenizer_config(pretrained_model_name_or_path, **hub_kwargs).get("tokenizer_class")
            tokenizer_class = (named and tokenizer_class_from_name(named)) or AutoTokenizer
            kwargs["tokenizer"] = tokenizer_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """transformers 5.24's hook: the sub-processors `from_pretrained` loaded."""
        return [kwargs.pop("image_processor"), kwargs.pop("tokenizer")]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, without its side effect on this processor: saving remote code sets `auto_map` on the
        object saved (the file gets it either way), which would make a saved processor's `to_dict` differ from
        the same processor loaded back."""
        had_auto_map = "auto_map" in self.__dict__
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if not had_auto_map:
                self.__dict__.pop("auto_map", None)

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

    def _merged_kwargs(self, kwargs: dict) -> dict[str, dict]:
        """`_merge_kwargs`, but a keyword that belongs to no modality's typed kwargs is an error (transformers would
        only warn, and a misspelt budget would silently fall back to the default).

        Declared video and audio kwargs (`num_frames`, `fps`, `sampling_rate`, ...) are taken as transformers'
        image-only processors take them: there are no videos or audio here, so they change nothing."""
        typed = NanoVLMProcessorKwargs.__annotations__
        known = {name for group in MODALITY_KWARGS for name in typed[group].__annotations__}
        unknown = set(kwargs) - known - set(typed) - {"common_kwargs"}
        for group in (*MODALITY_KWARGS, "common_kwargs"):
            unknown |= set(kwargs.get(group) or {}) - known
        unknown = sorted(unknown)
        if unknown:
            per_call = NanoVLMImagesKwargs.__annotations__.keys() - ImagesKwargs.__annotations__.keys()
            raise TypeError(
                f"unknown plan setting(s) {unknown}: neither a tokenizer argument nor one of the image plan's "
                f"fields a call may change {sorted(per_call - set(MODEL_SETTINGS))}"
            )
        # The tokenizer's saved padding side is "right"; the processor's left default (for generation) wins
        # unless the call asks otherwise.
        init_kwargs = {key: value for key, value in self.tokenizer.init_kwargs.items() if key != "padding_side"}
        return self._merge_kwargs(NanoVLMProcessorKwargs, tokenizer_init_kwargs=init_kwargs, **kwargs)

    def __call__(
        self,
        images: ImageInput | list[ImageInput] | list[list[ImageInput]] | None = None,
        text: TextInput | list[TextInput] | None = None,
        **kwargs: Unpack[NanoVLMProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize `text` with each `<image>` expanded to its planned tokens, and process `images`.

        `text` is a string or a list of strings; `images` a flat list (in placeholder order) or one list
        per sample, each a PIL image, array, tensor, path, bytes, URL or base64 string. Positionally the order is
        transformers' (images, text); the older (text, images) is recognised too, as text is never an image.
        Plan fields (`max_image_tokens`, `max_image_size`, ...) may be overridden per call, flat or in
        `images_kwargs`; `max_image_tokens_per_sample` is one budget shared by the images of each sample (text).
        Padding is on the left by default, as generation wants; training collators pad on the right.
        `videos`, `audio` and `audios` may be given None or empty, as generic clients pass them; declared video and
        audio kwargs are accepted and change nothing. `return_mm_token_type_ids=True` adds `mm_token_type_ids`
        (1 at image tokens, 0 elsewhere).
        """
        if _is_text(images) and text is not None and not _is_text(text):
            images, text = text, images
        _refuse_videos_and_audio(kwargs)
        merged = self._merged_kwargs(kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.get("return_tensors", images_kwargs.get("return_tensors"))
        return_mm_token_type_ids = text_kwargs.pop(
            "return_mm_token_type_ids", merged.get("return_mm_token_type_ids", False)
        )
        # Where each `<image>` went in the expanded text: `apply_chat_template(..., return_assistant_tokens_mask=True)`
        # asks for it to move the assistant spans past the image tokens.
        return_replacement_offsets = text_kwargs.pop(
            "return_text_replacement_offsets", merged.get("return_text_replacement_offsets", False)
        )
        if text is None:
            if images is None:
                raise ValueError("give text, images, or both")
            return self.image_processor(images, **images_kwargs)
        single = isinstance(text, str)
        text = [text] if single else list(text)
        if not all(isinstance(sample, str) for sample in text):
            raise TypeError("text must be a string or a list of strings")
        if single and images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        grouped = self._images_per_sample(text, images)
        image_inputs, text, replacement_offsets = self._expand_images(text, grouped, images_kwargs)

        encoding = self.tokenizer(text, **text_kwargs)
        self._check_image_tokens(encoding["input_ids"], [sample.count(IMAGE_TOKEN) for sample in text])
        data = {**encoding, **image_inputs}
        if return_replacement_offsets:
            data["text_replacement_offsets"] = replacement_offsets
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(encoding["input_ids"])
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _expand_images(self, text: list[str], grouped: list[list], images_kwargs: dict):
        """(image inputs, `text` with each `<image>` expanded to its planned tokens, where each expansion went);
        an unreadable image's error names its sample."""
        if not any(grouped):
            return {}, text, [[] for _ in text]
        try:
            image_inputs, replacements = self._process_images(grouped, **images_kwargs)
        except ValueError as error:  # ImageInputError; remote code loads the image processor's own copy of it
            if not hasattr(error, "image_index"):
                raise
            sample = _sample_of_image(error.image_index, grouped)
            raise ImageInputError(f"sample {sample}, {error}", image_index=error.image_index) from error
        text, replacement_offsets = self.get_text_with_replacements(text, replacements)
        return image_inputs, text, replacement_offsets

    def _process_images(self, images: list[list], **kwargs):
        """transformers' hook without its `make_flat_list_of_images`: `images` is one list per sample here (the
        images of a sample are planned together: they share `max_image_tokens_per_sample`), and may hold paths or
        encoded bytes, which that helper refuses."""
        image_inputs = self.image_processor(images, **kwargs)
        count = sum(len(group) for group in images)
        return image_inputs, [self.replace_image_token(image_inputs, index) for index in range(count)]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text one `<image>` placeholder becomes: as many `<image>` tokens as the image's plan gives."""
        token_height, token_width = (int(side) for side in image_inputs["image_token_hw"][image_idx])
        return IMAGE_TOKEN * (token_height * token_width)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Image tokens (and patches) per (height, width) in `image_sizes`, under this call's plan settings; each
        image is planned as a sample of its own (a per-sample budget caps it alone)."""
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge_kwargs(NanoVLMProcessorKwargs, **kwargs)["images_kwargs"]
        images_kwargs = {key: value for key, value in images_kwargs.items() if key in NanoVLMImageProcessor.plan_fields}
        plans = [self.image_processor.plan(height, width, **images_kwargs) for height, width in image_sizes]
        return MultiModalData(
            num_image_tokens=[plan.num_tokens for plan in plans], num_image_patches=[plan.num_patches for plan in plans]
        )

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


MODALITY_KWARGS = ("text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs")


def _is_text(value) -> bool:
    """A string or a non-empty list of strings: what `text` takes."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(item, str) for item in value)


def _refuse_videos_and_audio(kwargs: dict) -> None:
    """Take `videos`, `audio`, `audios` out of `kwargs`: None or empty is what generic clients send to any processor
    (lmms-eval: `videos=[], audios=[]`); anything in them is an error, never silently dropped."""
    for name in ("videos", "audio", "audios"):
        value = kwargs.pop(name, None)
        if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
            continue
        raise ValueError(
            f"nanoVLM takes images and text only: {name} must be None or empty, got {type(value).__name__}"
            + (f" of {len(value)}" if hasattr(value, "__len__") else "")
        )


def _load_tokenizer(text_model, gguf_file: str | None = None):
    """The LM's tokenizer from a Hub id or folder, or from a GGUF file (`*.gguf`, or a folder + `gguf_file`).

    (The model package's `backbones.split_gguf` rules, repeated: this module is exported on its own.)"""
    text_model = str(text_model)
    if gguf_file is None and text_model.endswith(".gguf"):
        if not Path(text_model).is_file():
            raise FileNotFoundError(f"no GGUF file at {text_model}")
        text_model, gguf_file = str(Path(text_model).parent), Path(text_model).name
    if gguf_file is None:
        return AutoTokenizer.from_pretrained(text_model)
    if text_model.endswith(".gguf") or not str(gguf_file).endswith(".gguf"):
        raise ValueError(f"give either a .gguf path or a folder with gguf_file=NAME.gguf, not {text_model!r} with "
                         f"gguf_file={gguf_file!r}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"loading the GGUF file {gguf_file} needs the `gguf` package (pip install 'nanovlm[gguf]', or pip install "
            "gguf)"
        )
    return AutoTokenizer.from_pretrained(text_model, gguf_file=gguf_file)


def _sample_of_image(image_index: int | None, grouped: list[list]) -> int | None:
    """Which sample the image at `image_index` (counted across the batch) belongs to."""
    if image_index is None:
        return None
    for sample, group in enumerate(grouped):
        if image_index < len(group):
            return sample
        image_index -= len(group)
    return None


__all__ = [
    "NanoVLMProcessor",
    "NanoVLMProcessorKwargs",
    "NanoVLMImagesKwargs",
    "ImageTextMismatchError",
    "IMAGE_TOKEN",
]
