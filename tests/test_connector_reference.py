"""Every connector variant computes what it computed before the connector became one class per mode.

`tests/data/connector_reference.safetensors` holds, per variant, the image features and the last positions' logits
that the code before that refactor gave for fixed inputs and fixed weights (each parameter a deterministic function
of its name and shape, so they need no random generator and no file). Regenerate it only for an intended change:

    python tests/test_connector_reference.py --write
"""

import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config
from processing import NanoVLMImageProcessor, NanoVLMProcessor

from offline_tokenizer import build_tokenizer

REFERENCE = Path(__file__).parent / "data" / "connector_reference.safetensors"
VARIANTS = {
    "shuffle": {},
    "shuffle_2_4": {"shuffle_factors": [2, 4]},
    "shared_cells": {"shuffle_factors": [2, 4], "shared_cell_encoder": True},
    "main_job": {"shuffle_factors": [2, 4], "shared_cell_encoder": True, "cell_context_kernel": 3,
                 "token_context_kernel": 3, "image_token_positions": True},
    "token_context_only": {"token_context_kernel": 3, "image_token_positions": True},
    "perceiver": {"connector": "perceiver", "perceiver_latents": 16, "perceiver_depth": 2, "perceiver_heads": 2,
                  "perceiver_head_dim": 32},
    "perceiver_pooled": {"connector": "perceiver", "perceiver_latents": 16, "perceiver_depth": 2,
                         "perceiver_heads": 2, "perceiver_head_dim": 32, "perceiver_pooled_queries": True},
}
# per-image budgets that make the shuffle plans use every factor and, at 6 tokens, pool (a Perceiver always gives
# its 16 latents)
BUDGETS = {"shuffle": [96, 6], "perceiver": [96, 16]}


def fixed_weights(model: torch.nn.Module) -> None:
    """Each parameter a smooth function of its position, phase-shifted by a hash of its name: the same on any code
    that keeps the parameter's name and shape."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            phase = zlib.crc32(name.encode()) / 2**32 * 2 * np.pi
            steps = torch.arange(parameter.numel(), dtype=torch.float64)
            values = 0.08 * torch.sin(0.7 * steps + phase) + (1.0 if name.endswith("norm.weight") else 0.0)
            parameter.copy_(values.reshape(parameter.shape).to(parameter.dtype))


def outputs(name: str) -> dict[str, torch.Tensor]:
    tokenizer = build_tokenizer(["Which digit is shown and where? 7 top-left"] * 20)
    config = tiny_config(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         **VARIANTS[name])
    model = NanoVLMForConditionalGeneration(config).eval()
    fixed_weights(model)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(90, 170), (200, 64), (130, 130)]]
    result = {}
    for budget in BUDGETS[config.connector]:
        image_processor = NanoVLMImageProcessor.from_model_config(config, max_image_tokens=budget)
        processor = NanoVLMProcessor(image_processor, tokenizer)
        batch = processor(text=["<image>Which digit?", "<image><image>Where?"], images=[images[:1], images[1:]],
                          return_tensors="pt")
        with torch.no_grad():
            images_only = {key: batch[key] for key in processor.image_processor.model_input_names}
            result[f"{budget}.features"] = model.get_image_features(**images_only).float()
            result[f"{budget}.logits"] = model(**batch).logits[:, -4:].float()
    return result


def test_every_connector_variant_computes_what_it_did_before_the_refactor():
    reference = load_file(REFERENCE)
    for name in VARIANTS:
        for key, value in outputs(name).items():
            torch.testing.assert_close(value, reference[f"{name}.{key}"], rtol=1e-5, atol=1e-5, msg=f"{name} {key}")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    save_file({f"{name}.{key}": value.contiguous() for name in VARIANTS for key, value in outputs(name).items()},
              str(REFERENCE))
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes)")
