"""The training stack: rows to batches (`NanoVLMCollator`), bucketing batch samplers for map-style datasets and
streams, dataset size columns, and `NanoVLMTrainer`. Never exported to the Hub; `processing` and `modeling_nanovlm`
re-export these names.

The trainer is imported on first use only: it pulls in transformers' Trainer stack.
"""

from .collator import BadRowError, NanoVLMCollator
from .rows import PlannedRows
from .sampler import BucketBatchSampler, PlannedIndex, bucket_key
from .sizes import add_image_sizes, add_text_lengths, keep_images_encoded
from .streaming import StreamingBucketBatches


def __getattr__(name: str):
    if name == "NanoVLMTrainer":
        from .trainer import NanoVLMTrainer

        return NanoVLMTrainer
    raise AttributeError(name)


__all__ = [
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
]  # and NanoVLMTrainer, imported on first use (not by `import *`)
