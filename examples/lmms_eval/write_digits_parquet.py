"""Write the built-in task's held-out digits to nanovlm_digits/test.parquet, the rows `finetune.py` evaluates (same
digits, same layouts, same order), for the lmms-eval task `nanovlm_digits`:

    python examples/lmms_eval/write_digits_parquet.py [--eval_samples N]
    lmms-eval --model nanovlm_hf --model_args pretrained=outputs/digits/model --tasks nanovlm_digits \
        --include_path examples/lmms_eval --batch_size 32

Run both from the repository root (the task reads examples/lmms_eval/nanovlm_digits/test.parquet).
"""

import argparse
import io
import sys
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/
from digits import QUESTION, load_split  # noqa: E402
from digits_eval import held_out_task  # noqa: E402
from digits_recipe import RECIPE  # noqa: E402

OUTPUT = Path(__file__).resolve().parent / "nanovlm_digits" / "test.parquet"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the model sees the pixels finetune.py's evaluation sees
    return buffer.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval_samples", type=int, help="held-out rows (default: all, as finetune.py)")
    args = parser.parse_args()
    test = held_out_task(RECIPE, *load_split()["test"], limit=args.eval_samples)
    order = sorted(range(len(test)), key=test.canvas_size)  # finetune.py's order
    rows = [test[index] for index in order]
    table = datasets.Dataset.from_dict(
        {"id": list(range(len(rows))), "image": [{"bytes": png(row["image"]), "path": None} for row in rows],
         "question": [QUESTION] * len(rows), "answer": [row["answer"] for row in rows]},
        features=datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(),
                                    "question": datasets.Value("string"), "answer": datasets.Value("string")}),
    )
    table.to_parquet(OUTPUT)
    print(f"{len(rows)} held-out rows -> {OUTPUT}")


if __name__ == "__main__":
    main()
