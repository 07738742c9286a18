"""The digits task for lmms-eval, scored with the parser finetune.py's evaluation uses."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # examples/
from digits import parse_answer  # noqa: E402


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    guess, truth = parse_answer(results[0]), parse_answer(doc["answer"])
    return {
        "digit_accuracy": float(guess[0] == truth[0]),
        "quadrant_accuracy": float(guess[1] == truth[1]),
        "both_accuracy": float(guess == truth),
    }
