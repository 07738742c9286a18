"""The main job: train nanoVLM, evaluate it on held-out data, save a Hub-ready folder, reload it, ask it something.

    python examples/finetune.py                      # the built-in task, from scratch (a few minutes on 2 CPU cores)
    python examples/finetune.py --output_dir DIR --max_steps N --seed S
    python examples/finetune.py --recipe max_side=256 --recipe shuffle_factors=[2,4]   # change the recipe
    python examples/finetune.py --text_model LM.gguf [--vision_model RUN/model]   # a real LM learns the digits
    python examples/finetune.py --vision_model V --text_model T --dataset D   # real backbones on a real dataset
    python examples/finetune.py --vision_model V --text_model T --dataset HuggingFaceM4/the_cauldron \\
        --dataset_config vqav2 [--skip_bad_rows] [--num_proc 8]          # a Cauldron / FineVision subset

This file reads the command line and hands over to one of two recipes:
  - `digits_recipe.py` (no --dataset): a tiny nanoVLM trained from scratch on the built-in digits task
    (`digits.py`) across image-token budgets; `RECIPE` there holds the tuned values, `--recipe KEY=VALUE` changes
    any of them. Writes `metrics.json` (held-out accuracy at the default budget, and `budget_curve`: accuracy and
    mean image tokens at budgets 144 / 64 / 36 / 16), `loss_curve.png`, `budget_curve.png` and `model/`.
    With `--text_model` (a folder, Hub id or GGUF file) the LM is that pretrained one, frozen, and the tower is
    trained from scratch or taken from `--vision_model` (a saved nanoVLM's tower, or a DINOv3 checkpoint); its
    greedy answers to 20 text-only questions are printed before and after training (metrics: text_answers_unchanged).
  - `finetune_dataset.py` (--vision_model, --text_model, --dataset): real backbones fine-tuned on a real dataset;
    writes `metrics.json` (held-out exact match), `loss_curve.png` and `model/`.
`model/` holds the model, the processor and a model card, loadable with `AutoModelForImageTextToText` /
`AutoProcessor` `.from_pretrained(folder, trust_remote_code=True)`; `--push_to_hub REPO` pushes it. Under
`torchrun --nproc_per_node N` or `accelerate launch` it trains on N processes (every sample once per epoch) and
process 0 evaluates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (str(HERE.parent), str(HERE)):  # runs from a checkout, installed or not
    if _path not in sys.path:
        sys.path.insert(0, _path)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; `--vision_model`, `--text_model` and `--dataset` go together."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/digits")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="optimizer steps (built-in task: RECIPE['max_steps']; --dataset: one epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--push_to_hub", metavar="REPO", help="after saving, push the model and processor to REPO")

    digits = parser.add_argument_group("the built-in task (digits_recipe.py)")
    digits.add_argument("--connector", choices=("shuffle", "perceiver"), default="shuffle",
                        help="'shuffle' (pixel shuffle by factor 2, 3 or 4 under the budget, trained across "
                        "budgets) or 'perceiver' (a fixed number of tokens per image, whatever the budget)")
    digits.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                        help="change one RECIPE value (JSON: 256, 1e-3, [2, 4], null); repeatable")
    digits.add_argument("--min_side", type=int, help="smallest canvas side (px)")

    real = parser.add_argument_group("real backbones on a real dataset (finetune_dataset.py)")
    real.add_argument("--vision_model", help="DINOv3 checkpoint (Hub id or folder) to fine-tune; on the built-in "
                      "task also a saved nanoVLM folder, whose tower is taken")
    real.add_argument("--text_model", help="Llama-family LM with its tokenizer (Hub id, folder, or a .gguf file) to "
                      "fine-tune; without --dataset it learns the built-in task, frozen")
    real.add_argument("--dataset", help="datasets.load_dataset name, a data folder, or a save_to_disk folder, "
                      "with an image/images column and Cauldron/FineVision 'texts' turns, messages, or "
                      "question/prompt + answer")
    real.add_argument("--dataset_config", help="the dataset's subset (config), e.g. 'vqav2' of "
                      "HuggingFaceM4/the_cauldron; for a local folder, a sub-folder of it, else a config name")
    real.add_argument("--dataset_split", default="train", help="the training split")
    real.add_argument("--eval_split", help="the held-out split (default: test or validation, else a tenth of train)")
    real.add_argument("--skip_bad_rows", action="store_true",
                      help="skip rows with a broken image or an empty answer (counted and reported at the end) "
                      "instead of stopping with an error naming the row")
    real.add_argument("--num_proc", type=int, default=None,
                      help="processes for reading image sizes and text lengths once (datasets.map, cached)")

    both = parser.add_argument_group("settings for either (default: the recipe's)")
    both.add_argument("--batch_size", type=int)
    both.add_argument("--train_samples", type=int, help="train on the first N training digits / dataset rows")
    both.add_argument("--learning_rate", type=float,
                      help="built-in task: every part's rate; --dataset: the backbones' (the new connector keeps 1e-3)")
    both.add_argument("--max_side", type=int, help="largest image side (px): canvases / the processor's limit")
    both.add_argument("--max_image_tokens", type=int, help="the image-token budget the processor is saved with")
    both.add_argument("--eval_samples", type=int, help="held-out rows to evaluate")
    both.add_argument("--max_new_tokens", type=int, help="tokens generated per held-out answer")
    both.add_argument("--logging_steps", type=int, default=10)
    both.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, OMP_NUM_THREADS or all "
                      "cores); on cores shared with other busy jobs, 1 avoids oversubscription (2 ran 7-30x slower)")
    args = parser.parse_args(argv)

    if args.dataset and not (args.vision_model and args.text_model):
        parser.error("--dataset needs --vision_model and --text_model")
    if args.vision_model and not args.text_model:
        parser.error("--vision_model goes with --text_model (the built-in task's own model has no pretrained parts)")
    if (args.dataset_config or args.skip_bad_rows or args.num_proc) and not args.dataset:
        parser.error("--dataset_config, --skip_bad_rows and --num_proc apply to --dataset")
    if args.dataset and (args.recipe or args.min_side or args.connector != "shuffle"):
        parser.error("--recipe, --min_side and --connector apply to the built-in task, not to --dataset")
    return args


def main(argv=None) -> dict:
    """Run the job the command line asks for; returns its metrics (empty on processes other than the main one)."""
    args = parse_args(argv)
    import numpy as np
    import torch

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_flush_denormal(True)  # CPU: tiny activations as denormal floats slow steps ~15 %; losses identical
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset:
        from finetune_dataset import run
    else:
        from digits_recipe import run
    return run(args)


if __name__ == "__main__":
    main()
