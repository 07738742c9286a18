"""Saving, remote-code loading in a fresh process, Auto registration, and building from pretrained backbones."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fresh_process import BLOCK_REPOSITORY  # tests/ is on sys.path (pytest's rootdir insertion)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from modeling_nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMModel, tiny_config
from processing import NanoVLMImageProcessor, NanoVLMProcessor

from offline_tokenizer import build_tokenizer


def run_fresh(script: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_REPOSITORY + textwrap.dedent(script)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def save_with_reference(folder, **config_overrides):
    """A tiny model + processor saved as a Hub-ready folder, with reference logits for one input next to it."""
    tokenizer = build_tokenizer(["Which digit is shown and where? 7 top-left"] * 20)
    config = tiny_config(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         **config_overrides)
    processor = NanoVLMProcessor(NanoVLMImageProcessor.from_model_config(config, max_image_tokens=48), tokenizer)
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = np.random.default_rng(0).integers(0, 256, (90, 170, 3), dtype=np.uint8)
    np.save(folder.parent / "image.npy", image)
    batch = processor(text=["<image>Which digit is shown and where?"], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"batch": dict(batch), "logits": logits}, folder.parent / "reference.pt")
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_with_reference(tmp_path_factory.mktemp("export") / "nanovlm")


@pytest.fixture(scope="module")
def saved_with_connector_options(tmp_path_factory):
    """The main job's connector: shared cell encoder, both context convolutions, token positions."""
    return save_with_reference(tmp_path_factory.mktemp("export_options") / "nanovlm", shuffle_factors=[2, 4],
                               shared_cell_encoder=True, cell_context_kernel=3, token_context_kernel=3,
                               image_token_positions=True)


def test_saved_folder_is_hub_ready(saved):
    files = set(os.listdir(saved))
    assert {"config.json", "model.safetensors", "modeling_nanovlm.py", "configuration_nanovlm.py"} <= files
    assert {"processor_config.json", "image_processing_nanovlm.py", "processing_nanovlm.py", "tokenizer.json"} <= files
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_nanovlm.NanoVLMForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_nanovlm.NanoVLMConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_nanovlm.NanoVLMModel"
    processor_config = json.loads((saved / "processor_config.json").read_text())
    assert processor_config["image_processor"]["max_image_tokens"] == 48


# The context convolutions run through oneDNN, whose choice of algorithm may differ between processes (thread
# count, first call): their logits agree to float rounding, the rest bit for bit.
@pytest.mark.parametrize("folder, tolerance", [("saved", 0.0), ("saved_with_connector_options", 1e-5)])
def test_fresh_process_auto_classes_give_identical_logits(folder, tolerance, request):
    saved = request.getfixturevalue(folder)
    out = run_fresh(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
        folder = {str(saved)!r}
        reference = torch.load({str(saved.parent / "reference.pt")!r}, weights_only=False)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(config).__name__ == "NanoVLMConfig", type(config)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__ == "NanoVLMForConditionalGeneration" and type(base).__name__ == "NanoVLMModel"
        for loaded in (model, base):
            assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
        with torch.no_grad():
            logits = model(**reference["batch"]).logits
            headless = model.lm_head(base(**reference["batch"]).last_hidden_state)  # the head-less model's states
        for found in (logits, headless):
            difference = (found - reference["logits"]).abs().max().item()
            assert difference <= {tolerance}, difference
        print("identical")
        """,
        cwd=saved.parent,
    )
    assert "identical" in out


def test_fresh_process_auto_processor_gives_identical_inputs(saved):
    out = run_fresh(
        f"""
        import numpy as np, torch
        from transformers import AutoProcessor
        folder = {str(saved)!r}
        reference = torch.load({str(saved.parent / "reference.pt")!r}, weights_only=False)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__name__ == "NanoVLMProcessor", type(processor)
        assert processor.image_processor.max_image_tokens == 48
        image = np.load({str(saved.parent / "image.npy")!r})
        batch = processor(text=["<image>Which digit is shown and where?"], images=[image], return_tensors="pt")
        for key, value in reference["batch"].items():
            assert torch.equal(batch[key], value), key
        print("identical")
        """,
        cwd=saved.parent,
    )
    assert "identical" in out


def test_our_processor_class_loads_a_model_folder_without_asking(saved):
    """`NanoVLMProcessor.from_pretrained(model folder)` with only the processing package imported: the folder's
    config.json carries an auto_map, which AutoTokenizer would read and ask "run the custom code? [y/N]" about."""
    script = f"""
from processing import NanoVLMProcessor
processor = NanoVLMProcessor.from_pretrained({str(saved)!r})
print(type(processor.image_processor).__module__, processor.image_processor.max_image_tokens)
"""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", script], cwd=root, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["processing.image_processing_nanovlm", "48"]
    assert "custom code" not in result.stdout + result.stderr
    assert "instantiate a model of type" not in result.stderr


def test_importing_the_package_registers_the_auto_classes(saved):
    config = AutoConfig.from_pretrained(saved)
    assert isinstance(config, NanoVLMConfig)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(saved), NanoVLMForConditionalGeneration)
    assert isinstance(AutoModel.from_pretrained(saved), NanoVLMModel)


def test_from_backbones_loads_both_pretrained_parts(tmp_path):
    torch.manual_seed(0)
    vision = DINOv3ViTModel(
        DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        num_register_tokens=2)
    )
    tokenizer = build_tokenizer(["a tiny language model for tests"] * 10)
    tokenizer.add_special_tokens({"additional_special_tokens": []})
    language = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer) - 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    )
    vision.save_pretrained(tmp_path / "vision")
    language.save_pretrained(tmp_path / "text")
    # a text checkpoint whose tokenizer lacks <image>, as real LMs do
    plain = build_tokenizer(["a tiny language model for tests"] * 10)
    plain.save_pretrained(tmp_path / "text")

    model = NanoVLMForConditionalGeneration.from_backbones(str(tmp_path / "vision"), str(tmp_path / "text"))
    processor = NanoVLMProcessor.from_backbones(str(tmp_path / "text"), max_image_tokens=16)

    for name, tensor in vision.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[name], tensor), name
    embeddings = model.get_input_embeddings().weight
    original = language.get_input_embeddings().weight
    assert torch.equal(embeddings[: original.shape[0]], original)
    assert embeddings.shape[0] >= len(processor.tokenizer) and embeddings.shape[0] % 64 == 0
    assert model.config.image_token_id == processor.image_token_id
    assert model.config.base_models == [str(tmp_path / "vision"), str(tmp_path / "text")]
    eos = model.generation_config.eos_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in ([eos] if isinstance(eos, int) else eos)
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    batch = processor(text=["<image>describe"], images=[image], return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()


def test_version_has_one_source():
    """`modeling_nanovlm.__version__` is the package version: setup.cfg reads it rather than repeating it."""
    import configparser
    from pathlib import Path

    from packaging.version import Version

    import modeling_nanovlm

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: modeling_nanovlm.__version__"
    assert str(Version(modeling_nanovlm.__version__)) == modeling_nanovlm.__version__  # a normalised PEP 440 version
