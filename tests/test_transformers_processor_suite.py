"""transformers' own processor conventions, checked by transformers' own tests: `ProcessorTesterMixin` from the
source distribution of the installed transformers, run on NanoVLMProcessor.

The sdist ships `tests/test_processing_common.py` (not the wheel); it is downloaded once with pip and cached under
~/.cache/nanovlm/ (NANOVLM_CACHE overrides). Its image URLs are served from a local HTTP server on 127.0.0.1, so
the chat-template tests load images by URL through our processor with no network. Where the sdist cannot be had
(no package index), the module is skipped with the reason.
"""

import functools
import http.server
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import types
import unittest
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

pytest.importorskip("parameterized", reason="transformers' processor tests need `parameterized` (the test extra)")

VERSION = transformers.__version__
CACHE = Path(os.environ.get("NANOVLM_CACHE", Path.home() / ".cache" / "nanovlm")) / f"transformers-{VERSION}-tests"
COMMON = CACHE / "test_processing_common.py"


def fetch_common_tests() -> str | None:
    """Cache tests/test_processing_common.py of the installed transformers' sdist; the reason it failed, or None."""
    if COMMON.is_file():
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
             f"transformers=={VERSION}", "-d", download],
            capture_output=True, text=True, timeout=300,
        )
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            return f"cannot download the transformers {VERSION} sdist: {result.stderr.strip()[-500:]}"
        with tarfile.open(archives[0]) as archive:
            member = archive.extractfile(f"transformers-{VERSION}/tests/test_processing_common.py")
            partial = COMMON.with_suffix(".part")
            partial.write_bytes(member.read())
            partial.replace(COMMON)  # a half-written cache is never read as the file
    return None


def serve(folder: Path) -> str:
    """An HTTP server on 127.0.0.1 for `folder`, in a daemon thread (lives as long as the test process)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def load_common_tests():
    """Import the cached module, with its CI-only helper `fetch_hub_objects_for_ci` (not in the sdist) standing in:
    image URLs go to a local copy served on 127.0.0.1; video and audio URLs are left as they are (no test of ours
    reads them: nanoVLM has no video or audio processor)."""
    assets = CACHE / "assets"
    assets.mkdir(exist_ok=True)
    sample = assets / "coco_sample.png"
    if not sample.is_file():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(sample)
    base = serve(assets)

    def url_to_local_path(url):
        name = url.rsplit("/", 1)[-1]
        return f"{base}/{name}" if (assets / name).is_file() else url

    sys.modules["fetch_hub_objects_for_ci"] = types.SimpleNamespace(url_to_local_path=url_to_local_path)
    spec = importlib.util.spec_from_file_location("transformers_test_processing_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reason = fetch_common_tests()
if reason:
    pytest.skip(reason, allow_module_level=True)
common = load_common_tests()

from processing import NanoVLMImageProcessor, NanoVLMProcessor  # noqa: E402

from offline_tokenizer import build_tokenizer  # noqa: E402

# The mixin's prompts ("lower newer", "upper older longer string") and chat turns, so they tokenize to a few tokens.
CORPUS = ["lower newer upper older longer string", "What is shown in this image? Describe it."] * 4


class NanoVLMProcessorTest(common.ProcessorTesterMixin, unittest.TestCase):
    """Every skip is the mixin's own, with its reason: tests of video and audio sub-processors (nanoVLM has
    neither), tests needing librosa / torchcodec (audio and video decoding), and tool calls (our chat template
    has no tools)."""

    processor_class = NanoVLMProcessor

    @classmethod
    def setUpClass(cls):
        # An in-library processor's image processor is in AutoImageProcessor's mapping, and the mixin loads it with
        # a bare AutoImageProcessor.from_pretrained(folder); ours is only there once registered (a saved folder
        # alone is remote code, which asks for trust_remote_code).
        from transformers import AutoImageProcessor
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

        from modeling_nanovlm import NanoVLMConfig

        cls._registered = dict(IMAGE_PROCESSOR_MAPPING._extra_content)
        AutoImageProcessor.register(NanoVLMConfig, NanoVLMImageProcessor, exist_ok=True)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

        IMAGE_PROCESSOR_MAPPING._extra_content.clear()
        IMAGE_PROCESSOR_MAPPING._extra_content.update(cls._registered)
        super().tearDownClass()

    @classmethod
    def _setup_image_processor(cls):
        return NanoVLMImageProcessor(max_image_tokens=64, max_image_size=512)

    @classmethod
    def _setup_tokenizer(cls):
        return build_tokenizer(CORPUS)

    def _test_apply_chat_template(self, modality, batch_size, return_tensors, input_name, processor_name, input_data):
        # transformers counts one `pixel_values` row per image unless there is an `image_grid_thw`; ours are all
        # images' patches in one flat array (Qwen2-VL's layout) with one `image_grid_hw` row per image: count those.
        self.image_grid_input_name = "image_grid_hw"
        super()._test_apply_chat_template(
            modality, batch_size, return_tensors, "image_grid_input_name", processor_name, input_data
        )

    def test_get_num_multimodal_tokens_matches_processor_call(self):
        # transformers' version loops over the torchvision and PIL backends (ours has one) and reloads the image
        # processor with another `size` (ours has none: each image's size comes from its plan). The same check at
        # the saved budget, then with a per-call budget flat and nested, as vLLM would pass it.
        if not hasattr(self, "_check_num_image_tokens_match_processor_call"):  # transformers < 5.25: no backend loop
            return super().test_get_num_multimodal_tokens_matches_processor_call()
        processor = self.get_processor()
        self._check_num_image_tokens_match_processor_call(processor)
        self._check_num_image_tokens_match_processor_call(processor, max_image_tokens=16)
        self._check_num_image_tokens_match_processor_call(processor, images_kwargs={"max_image_tokens": 9})
