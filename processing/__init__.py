"""nanoVLM processing package. Its flat modules, the image processor (the token plan) and the processor, are exported
to the Hub with a saved model; the `training` sub-package (collator, bucketing samplers, dataset size columns, the
Trainer) is not.

    from processing import NanoVLMImageProcessor, NanoVLMProcessor

    processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=256), tokenizer)
    batch = processor(text=["<image>What is shown?"], images=[image], return_tensors="pt")

See docs/architecture.md for who owns which rule.
"""

from .chat_templates import CHAT_TEMPLATE, chat_template_for
from .image_loading import ImageInputError, image_size, load_image
from .image_processing_nanovlm import ImagePlan, NanoVLMImageProcessor, plan_image, plan_images
from .processing_nanovlm import IMAGE_TOKEN, ImageTextMismatchError, NanoVLMProcessor

__all__ = [
    "NanoVLMImageProcessor",
    "NanoVLMProcessor",
    "ImagePlan",
    "ImageInputError",
    "ImageTextMismatchError",
    "plan_image",
    "plan_images",
    "load_image",
    "image_size",
    "CHAT_TEMPLATE",
    "chat_template_for",
    "IMAGE_TOKEN",
]

# Hub export: save_pretrained writes these modules next to processor_config.json with an auto_map.
NanoVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
NanoVLMProcessor.register_for_auto_class("AutoProcessor")

# The training stack's names (`training.__all__`), not part of the Hub export.
from . import training  # noqa: E402
from .training import *  # noqa: E402, F403

__all__ += training.__all__
