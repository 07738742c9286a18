"""nanoVLM model package. Importing it registers the classes with transformers' Auto factories.

    from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, tiny_config

    model = NanoVLMForConditionalGeneration(tiny_config())

See docs/architecture.md for the data path from `processor(...)` to the language model.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_nanovlm import NanoVLMConfig, small_config, tiny_config
from .connector import PerceiverConnector, ShuffleConnector, build_connector, pixel_shuffle, pixel_unshuffle
from .modeling_nanovlm import IMAGE_TOKEN, NanoVLMForConditionalGeneration, NanoVLMModel, NanoVLMPreTrainedModel

# The one place the version is written: setup.cfg reads it (`version = attr: modeling_nanovlm.__version__`).
__version__ = "0.1.0"

AutoConfig.register(NanoVLMConfig.model_type, NanoVLMConfig, exist_ok=True)
AutoModel.register(NanoVLMConfig, NanoVLMModel, exist_ok=True)
AutoModelForImageTextToText.register(NanoVLMConfig, NanoVLMForConditionalGeneration, exist_ok=True)
# Hub export: save_pretrained writes these modules next to the weights and an auto_map to them.
NanoVLMConfig.register_for_auto_class()
NanoVLMModel.register_for_auto_class("AutoModel")
NanoVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


def __getattr__(name: str):  # the trainer (training stack, not exported) pulls in the Trainer: import it when asked
    if name == "NanoVLMTrainer":
        from processing.training.trainer import NanoVLMTrainer

        return NanoVLMTrainer
    raise AttributeError(name)


__all__ = [
    "__version__",
    "NanoVLMConfig",
    "NanoVLMForConditionalGeneration",
    "NanoVLMModel",
    "NanoVLMPreTrainedModel",
    "NanoVLMTrainer",
    "ShuffleConnector",
    "PerceiverConnector",
    "build_connector",
    "pixel_shuffle",
    "pixel_unshuffle",
    "tiny_config",
    "small_config",
    "IMAGE_TOKEN",
]
