#!/usr/bin/env bash
# One short check for a lent GPU machine (well under 4 minutes once the machine is up):
#   the small_config preset (DINOv3 ViT-S/16 + SmolLM2-135M shapes, random weights), batches of 8 rows that each
#   hold a 1536x2048 image (2048-px long side) and 256 text tokens, bf16 autocast, gradient checkpointing;
#   prints step time, samples/s, LM tokens/s, peak memory and MFU, and the same batch with checkpointing off.
#
#   bash benchmarks/gpu_check.sh [extra benchmarks/gpu_check.py flags, e.g. --batch-size 4 --peak-tflops 989]
#
# Writes gpu_check.json (and gpu_check.txt) to $OUT when set (the device runner's output folder), else to
# benchmarks/results/. Installs nothing heavy: torch must be present; the repository is imported from this checkout
# (the scripts put it on sys.path), so no `pip install -e .` is needed. Only if transformers is missing does it try
# `pip install --no-deps` of the small pure-Python packages the model code needs (never torch).
# DEVICE=cpu runs the same script path on a CPU with the tiny preset (for testing the script itself).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
RESULTS="${OUT:-benchmarks/results}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$RESULTS"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_check: torch is not installed here; this check expects a machine with torch" >&2
    exit 2
fi
if ! "$PYTHON" -c "import transformers, huggingface_hub, safetensors, PIL, numpy" 2>/dev/null; then
    echo "gpu_check: installing the small pure-Python dependencies (no torch)"
    timeout 90 "$PYTHON" -m pip install --quiet --no-deps "transformers>=5.20,<6" "huggingface_hub>=1.0" \
        "safetensors>=0.4" "tokenizers>=0.20" pillow numpy pyyaml regex tqdm packaging filelock fsspec httpx \
        || { echo "gpu_check: could not install transformers (no network?)" >&2; exit 2; }
fi

"$PYTHON" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, capability {p.major}.{p.minor}")
else:
    print("no CUDA device visible")
EOF

if [ "$DEVICE" = "cuda" ]; then
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device; run with DEVICE=cpu to test the script on a CPU" >&2
        exit 2
    fi
    ARGS=(--device cuda --preset small --long-side 2048 --batch-size 8)
else
    ARGS=(--device "$DEVICE" --quick)
fi

timeout 200 "$PYTHON" benchmarks/gpu_check.py "${ARGS[@]}" --bf16 --checkpointing --compare-no-checkpointing \
    --json "$RESULTS/gpu_check.json" "$@" 2>&1 | tee "$RESULTS/gpu_check.txt"
exit "${PIPESTATUS[0]}"
