"""push_to_hub -> test Hub over HTTP -> fresh process loads through Auto classes and pipeline."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fresh_process import BLOCK_REPOSITORY  # noqa: E402

from hub_server import HubServer, run_client  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUSH = """
import numpy as np, torch
from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config
from processing import NanoVLMImageProcessor, NanoVLMProcessor
from offline_tokenizer import build_tokenizer

tokenizer = build_tokenizer(["Which digit is shown and where? 7 top-left"] * 20)
processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens={budget}, shuffle_factors={factors}), tokenizer)
torch.manual_seed(0)
model = NanoVLMForConditionalGeneration(
    tiny_config(vocab_size=len(tokenizer), image_token_id=processor.image_token_id)
).eval()
model.config.base_models = ["facebook/dinov3-vits16-pretrain-lvd1689m", "HuggingFaceTB/SmolLM2-135M"]
image = np.random.default_rng(0).integers(0, 256, (90, 170, 3), dtype=np.uint8)
batch = processor(text=["<image>Which digit is shown and where?"], images=[image], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits if {reference_forward} else None
torch.save({{"image": image, "logits": logits}}, {reference!r})
model.push_to_hub("{repo}", metrics={{"digit_accuracy": 0.93}})
processor.push_to_hub("{repo}")
"""


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


def push(hub, tmp_path, repo, budget=48, factors=(1, 2, 4), reference_forward=True):
    reference = str(tmp_path / "reference.pt")
    script = PUSH.format(
        budget=budget, factors=list(factors), reference=reference, repo=repo, reference_forward=reference_forward
    )
    pythonpath = os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "examples")])  # + the offline tokenizer
    run_client(script, hub.url, tmp_path / "hf_push", cwd=REPO_ROOT, env={"PYTHONPATH": pythonpath})
    return reference


def test_push_uploads_what_a_stranger_needs_and_loads_back_identically(hub, tmp_path):
    repo = "user/nanovlm-tiny"
    reference = push(hub, tmp_path, repo)
    files = hub.state.repo("model", repo).resolve("main").files
    expected = {
        "README.md", "config.json", "generation_config.json", "model.safetensors", "modeling_nanovlm.py",
        "configuration_nanovlm.py", "connector.py", "model_card.py", "processor_config.json",
        "image_processing_nanovlm.py", "image_loading.py", "processing_nanovlm.py", "chat_templates.py",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    }
    assert expected <= set(files), expected - set(files)
    card = files["README.md"].content.decode()
    assert "pipeline_tag: image-text-to-text" in card and "library_name: transformers" in card
    assert "HuggingFaceTB/SmolLM2-135M" in card and "digit_accuracy" in card and "trust_remote_code=True" in card
    assert json.loads(files["config.json"].content)["auto_map"]["AutoModelForImageTextToText"]
    assert json.loads(files["processor_config.json"].content)["image_processor"]["max_image_tokens"] == 48
    assert any("lfs" in path for _, path, _ in hub.requests), "weights should travel as an LFS object"

    out = run_client(
        BLOCK_REPOSITORY
        + f"""
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
reference = torch.load({reference!r}, weights_only=False)
model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
batch = processor(text=["<image>Which digit is shown and where?"], images=[reference["image"]], return_tensors="pt")
with torch.no_grad():
    assert torch.equal(model(**batch).logits, reference["logits"])
photo = Image.fromarray(load_sample_images().images[0])
chat = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)
content = [{{"type": "image", "image": photo}}, {{"type": "text", "text": "What is shown?"}}]
messages = [{{"role": "user", "content": content}}]
answer = chat(text=messages, max_new_tokens=6)[0]["generated_text"][-1]
assert answer["role"] == "assistant" and isinstance(answer["content"], str)
print("OK", repr(answer["content"]))
""",
        hub.url, tmp_path / "hf_load", cwd=tmp_path, env={"PYTHONPATH": None},
    ).stdout
    assert "OK" in out


def test_loading_without_trust_remote_code_says_so(hub, tmp_path):
    repo = "user/nanovlm-trust"
    push(hub, tmp_path, repo)
    out = run_client(
        BLOCK_REPOSITORY
        + f"""
from transformers import AutoModelForImageTextToText
try:
    AutoModelForImageTextToText.from_pretrained("{repo}")
except ValueError as error:
    assert "trust_remote_code" in str(error), error
    print("clear error")
""",
        hub.url, tmp_path / "hf_trust", cwd=tmp_path, env={"PYTHONPATH": None},
    ).stdout
    assert "clear error" in out


def test_truncated_weights_fail_loudly(hub, tmp_path):
    repo = "user/nanovlm-truncated"
    push(hub, tmp_path, repo)
    out = run_client(
        f"""
from huggingface_hub import HfApi, hf_hub_download
path = hf_hub_download("{repo}", "model.safetensors")
data = open(path, "rb").read()
HfApi().upload_file(path_or_fileobj=data[: len(data) // 2], path_in_repo="model.safetensors", repo_id="{repo}")
""" + BLOCK_REPOSITORY + f"""
from transformers import AutoModelForImageTextToText
try:
    AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True, force_download=True)
except Exception as error:
    print("failed:", type(error).__name__, error)
else:
    raise SystemExit("a truncated weights file loaded silently")
""",
        hub.url, tmp_path / "hf_trunc", cwd=tmp_path, env={"PYTHONPATH": None},
    ).stdout
    assert "failed:" in out


def test_processor_and_model_with_different_factors_fail_at_first_use(hub, tmp_path):
    repo = "user/nanovlm-mismatch"
    push(hub, tmp_path, repo, budget=2, factors=(1, 2, 4, 8), reference_forward=False)  # the model only has 1, 2, 4
    out = run_client(
        BLOCK_REPOSITORY
        + f"""
import numpy as np
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
batch = processor(text=["<image>hi"], images=[np.zeros((512, 512, 3), np.uint8)], return_tensors="pt")
try:
    model(**batch)
except ValueError as error:
    assert "shuffle factor 8" in str(error) and "shuffle_factors" in str(error), error
    print("clear error")
""",
        hub.url, tmp_path / "hf_mismatch", cwd=tmp_path, env={"PYTHONPATH": None},
    ).stdout
    assert "clear error" in out
