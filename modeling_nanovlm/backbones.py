"""Loading the parts `from_backbones` starts from: the LM from a Hub id, a folder or a GGUF file; the vision tower
from a DINOv3 checkpoint, a saved nanoVLM (its tower), or a config (random, to train from scratch).

Build time only: nothing here runs when a saved nanoVLM is loaded or used, and the `gguf` package is needed only
when a GGUF file is given (the optional extra `nanovlm[gguf]`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

GGUF_EXTRA = "the `gguf` package (pip install 'nanovlm[gguf]', or pip install gguf)"


def split_gguf(text_model, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None) for `text_model`: a path to a `*.gguf` file, or a folder / Hub id
    with `gguf_file` naming the file in it (transformers' `from_pretrained(folder, gguf_file=name)`)."""
    text_model = str(text_model)
    if gguf_file is not None:
        if not str(gguf_file).endswith(".gguf"):
            raise ValueError(f"gguf_file={gguf_file!r} is not a .gguf file name")
        if text_model.endswith(".gguf"):
            raise ValueError(f"give either a .gguf path ({text_model}) or a folder with gguf_file={gguf_file!r}")
        if Path(text_model).is_dir() and not (Path(text_model) / gguf_file).is_file():
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {text_model}")
        return text_model, str(gguf_file)
    if text_model.endswith(".gguf"):
        path = Path(text_model)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {text_model}")
        return str(path.parent), path.name
    return text_model, None


def _require_gguf(gguf_file: str) -> None:
    # transformers' own message names neither the file nor how to install the package
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading the GGUF file {gguf_file} needs {GGUF_EXTRA}")


def load_tokenizer(text_model, gguf_file: str | None = None):
    """The LM's tokenizer (with its chat template); from the GGUF file's metadata when given one."""
    folder, gguf_file = split_gguf(text_model, gguf_file)
    if gguf_file is None:
        return AutoTokenizer.from_pretrained(folder)
    _require_gguf(gguf_file)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def load_language_model(text_model, gguf_file: str | None = None):
    """The pretrained causal LM as a plain, saveable model.

    transformers de-quantises a GGUF file's weights to float32 but keeps the model marked as GGUF-quantised, and such
    a model refuses `save_pretrained`; so the same architecture is rebuilt from its config, without the quantisation
    entry, and given the de-quantised weights.
    """
    folder, gguf_file = split_gguf(text_model, gguf_file)
    if gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(folder)
    _require_gguf(gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    # strict: every tensor of the rebuilt model comes from the file (the tied head is the embedding)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.config.name_or_path = str(Path(folder) / gguf_file)
    return model.eval()


def load_vision_tower(vision_model):
    """A DINOv3 tower: pretrained (Hub id or folder), the tower of a saved nanoVLM folder, or random from a config."""
    if isinstance(vision_model, PretrainedConfig):
        return AutoModel.from_config(vision_model)
    if AutoConfig.from_pretrained(vision_model).model_type == "nanovlm":
        # a previous nanoVLM run's tower; its connector fits that run's LM width only, so it stays behind
        return AutoModel.from_pretrained(vision_model).vision_tower
    return AutoModel.from_pretrained(vision_model)
