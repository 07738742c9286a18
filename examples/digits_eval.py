"""Held-out evaluation of the built-in task: accuracy at each image-token budget (the budget curve), lowered per
call as a user would (`processor(..., max_image_tokens=B)`), printed as a table and plotted.

The held-out digits are never trained on (`digits.load_split`), and their layouts are the same on every run
(`EVAL_SEED`), over the whole canvas range whatever the training curriculum.
"""

from __future__ import annotations

import time
from pathlib import Path

from digits import QUESTION, DigitsTask, parse_answer
from training_tools import chat_prompt, generate_answers

EVAL_SEED = 1234  # held-out layouts are the same on every run, whatever --seed


def held_out_task(recipe: dict, images, labels, limit: int | None = None) -> DigitsTask:
    """The held-out digits as a task on the recipe's whole canvas range, laid out the same on every run."""
    return DigitsTask(images, labels, seed=EVAL_SEED, min_side=recipe["min_side"], max_side=recipe["max_side"],
                      limit=limit, digit_min=recipe["digit_min"], digit_max=recipe["digit_max"],
                      noise=recipe["noise"], margin=recipe["margin"])


def evaluate_budgets(model, processor, rows, budgets, max_new_tokens: int) -> dict[str, dict]:
    """Held-out accuracy at each budget, lowered per call as a user would: {"144": {"digit_accuracy", ...}, ...}."""
    prompt = chat_prompt(processor, QUESTION)
    truths = [parse_answer(row["answer"]) for row in rows]
    curve = {}
    for budget in budgets:
        started = time.perf_counter()
        answers = generate_answers(model, processor, [[row["image"]] for row in rows], [prompt] * len(rows),
                                   max_new_tokens, max_image_tokens=budget)
        guesses = [parse_answer(answer) for answer in answers]
        plans = [processor.image_processor.plan(row["image"].height, row["image"].width, max_image_tokens=budget)
                 for row in rows]
        curve[str(budget)] = {
            "digit_accuracy": sum(g[0] == t[0] for g, t in zip(guesses, truths)) / len(rows),
            "quadrant_accuracy": sum(g[1] == t[1] for g, t in zip(guesses, truths)) / len(rows),
            "both_accuracy": sum(g == t for g, t in zip(guesses, truths)) / len(rows),
            "mean_image_tokens": round(sum(plan.num_tokens for plan in plans) / len(rows), 2),
            "pooled_fraction": (sum(plan.pooled for plan in plans) / len(rows)
                                if processor.image_processor.connector == "shuffle" else None),
            "shuffle_factors": {str(f): sum(plan.shuffle_factor == f for plan in plans)
                                for f in sorted({plan.shuffle_factor for plan in plans})},
            "eval_seconds": round(time.perf_counter() - started, 1),
        }
    return curve


def print_budget_curve(curve: dict) -> None:
    """The budget curve as a table."""
    print("budget | digit  | quadrant | mean image tokens | pooled")
    for budget, point in curve.items():
        print(f"{budget:>6} | {point['digit_accuracy']:6.1%} | {point['quadrant_accuracy']:8.1%} | "
              f"{point['mean_image_tokens']:17.1f} | "
              + ("-" if point["pooled_fraction"] is None else f"{point['pooled_fraction']:.0%}"))


def plot_budget_curve(curve: dict, path: Path, title: str) -> None:
    """Held-out accuracy (left axis) and mean image tokens per image (right axis) against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(int(budget) for budget in curve)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("digit_accuracy", "digit accuracy"), ("quadrant_accuracy", "quadrant accuracy")):
        ax.plot(budgets, [100 * curve[str(b)][key] for b in budgets], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_ylim(0, 102)
    ax.set_xlabel("image-token budget (max_image_tokens, set per call)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    tokens = ax.twinx()
    tokens.plot(budgets, [curve[str(b)]["mean_image_tokens"] for b in budgets], color="tab:gray", ls="--",
                marker="s", label="mean image tokens per image")
    tokens.set_ylabel("image tokens per image")
    tokens.set_ylim(0, max(budgets) * 1.05)
    tokens.legend(loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
