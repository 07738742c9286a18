from .image_processing_nanovlm import ImageInputError, ImagePlan, NanoVLMImageProcessor, image_size, load_image, plan_image
from .processing_nanovlm import CHAT_TEMPLATE, IMAGE_TOKEN, ImageTextMismatchError, NanoVLMProcessor

__all__ = [
    "NanoVLMImageProcessor",
    "NanoVLMProcessor",
    "ImagePlan",
    "ImageInputError",
    "ImageTextMismatchError",
    "plan_image",
    "load_image",
    "image_size",
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
]

# Hub export: save_pretrained writes these modules next to processor_config.json with an auto_map.
NanoVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
NanoVLMProcessor.register_for_auto_class("AutoProcessor")

from .collator import BadRowError, NanoVLMCollator  # noqa: E402  (training helpers, not part of the Hub export)
from .sampler import BucketBatchSampler, PlannedIndex, bucket_key  # noqa: E402
from .rows import PlannedRows  # noqa: E402
from .sizes import add_image_sizes, add_text_lengths, keep_images_encoded  # noqa: E402
from .streaming import StreamingBucketBatches  # noqa: E402

__all__ += [
    "NanoVLMCollator",
    "BadRowError",
    "BucketBatchSampler",
    "PlannedIndex",
    "PlannedRows",
    "bucket_key",
    "StreamingBucketBatches",
    "add_image_sizes",
    "add_text_lengths",
    "keep_images_encoded",
]
