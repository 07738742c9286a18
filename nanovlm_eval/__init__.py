"""Evaluation harness adapters for nanoVLM (`pip install nanovlm[eval]`). Not part of the Hub export.

`nanovlm_eval.lmms_eval_model` registers the lmms-eval model `nanovlm_hf` through the `lmms_eval.models` entry point:

    lmms-eval --model nanovlm_hf --model_args pretrained=DIR,max_image_tokens=64 --tasks mmstar
"""
