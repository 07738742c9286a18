"""Draw an image's token plan: the resized image with its patch grid, the pixel-shuffle cells (s x s
patches, one LM token each) and, when even the largest s exceeds the budget, the pooled token cells.

    python examples/visualize_plan.py coffee --max_image_tokens 1024 --out docs/plan_coffee_1024.png
    python examples/visualize_plan.py photo.jpg --max_image_tokens 64
    python examples/visualize_plan.py coffee chelsea rocket --max_image_tokens_per_sample 256 --out plan_sample.png

IMAGE is a file or the name of a scikit-image sample (astronaut, coffee, chelsea, rocket, ...). Several images
are one prompt's: with `--max_image_tokens_per_sample` they share that budget, and each panel shows its share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from processing import ImagePlan, NanoVLMImageProcessor, load_image  # noqa: E402

PATCH = dict(color="white", linewidth=0.4, alpha=0.6)
SHUFFLE = dict(color="gold", linewidth=1.6)
POOLED = dict(color="red", linewidth=2.4)


def read_image(name: str):
    if Path(name).is_file():
        return load_image(name)
    from skimage import data

    if hasattr(data, name):
        return load_image(getattr(data, name)())
    raise SystemExit(f"{name!r} is neither a file nor a scikit-image sample (astronaut, coffee, chelsea, ...)")


def describe(plan: ImagePlan, height: int, width: int, budget: int) -> str:
    s = plan.shuffle_factor
    pooled = f", pooled from {plan.grid_height // s}x{plan.grid_width // s}" if plan.pooled else ""
    return (
        f"{height}x{width} -> {plan.resized_height}x{plan.resized_width}, "
        f"patch grid {plan.grid_height}x{plan.grid_width}, "
        f"s={s}, token grid {plan.token_height}x{plan.token_width}{pooled} = {plan.num_tokens} tokens (budget {budget})"
    )


def grid_lines(ax, rows: np.ndarray, cols: np.ndarray, height: int, width: int, style: dict):
    ax.hlines(rows, 0, width, **style)
    ax.vlines(cols, 0, height, **style)


def draw(image, plan: ImagePlan, processor: NanoVLMImageProcessor, title: str, out: Path):
    height, width = plan.resized_height, plan.resized_width
    fig, ax = plt.subplots(figsize=(8, 8 * height / width + 1.2), dpi=110)
    draw_panel(ax, image, plan, processor, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def draw_sample(images, plans: list[ImagePlan], processor: NanoVLMImageProcessor, titles: list[str], title: str,
                out: Path):
    """One panel per image of a prompt, side by side, each with its plan (its share of the per-sample budget)."""
    fig, axes = plt.subplots(1, len(images), figsize=(5 * len(images), 6.2), dpi=110, squeeze=False)
    for ax, image, plan, panel_title in zip(axes[0], images, plans, titles):
        draw_panel(ax, image, plan, processor, panel_title)
    fig.suptitle(title, fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def draw_panel(ax, image, plan: ImagePlan, processor: NanoVLMImageProcessor, title: str):
    height, width = plan.resized_height, plan.resized_width
    patch, s = processor.patch_size, plan.shuffle_factor
    resized = image.resize((width, height), resample=processor.resample)
    ax.imshow(np.asarray(resized), extent=(0, width, height, 0))
    shuffle = SHUFFLE if s > 1 else {**SHUFFLE, "linewidth": 0.6}  # s=1: every patch is a cell; keep it light
    grid_lines(ax, np.arange(0, height + 1, patch), np.arange(0, width + 1, patch), height, width, PATCH)
    cell = patch * s
    grid_lines(ax, np.arange(0, height + 1, cell), np.arange(0, width + 1, cell), height, width, shuffle)
    handles = [
        Line2D([], [], **PATCH, label=f"patch ({patch} px)"),
        Line2D([], [], **shuffle, label=f"shuffle cell ({s}x{s} patch{'es' if s > 1 else ''})"),
    ]
    if plan.pooled:  # the model pools the patch grid to (th*s, tw*s) and shuffles: token i spans rows i*H/th..
        rows = np.linspace(0, height, plan.token_height + 1)
        cols = np.linspace(0, width, plan.token_width + 1)
        grid_lines(ax, rows, cols, height, width, POOLED)
        handles.append(Line2D([], [], **POOLED, label="pooled token cell"))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title, fontsize=9)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=3, fontsize=8, frameon=False)
    ax.tick_params(labelsize=7)


def main(argv=None) -> ImagePlan | list[ImagePlan]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="+", help="image file(s) or scikit-image sample name(s): one prompt's images")
    parser.add_argument("--max_image_tokens", type=int, default=1024)
    parser.add_argument("--max_image_tokens_per_sample", type=int, default=None,
                        help="one budget shared by the images (default: none, each image gets max_image_tokens)")
    parser.add_argument("--max_image_size", type=int, default=2048)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--shuffle_factors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default plan_<image>_<budget>.png)")
    args = parser.parse_args(argv)

    processor = NanoVLMImageProcessor(
        patch_size=args.patch_size,
        max_image_tokens=args.max_image_tokens,
        max_image_size=args.max_image_size,
        shuffle_factors=args.shuffle_factors,
        max_image_tokens_per_sample=args.max_image_tokens_per_sample,
    )
    if len(args.image) > 1 or args.max_image_tokens_per_sample is not None:
        return draw_several(args, processor)
    args.image = args.image[0]
    image = read_image(args.image)
    plan = processor.plan(image.height, image.width)
    summary = describe(plan, image.height, image.width, args.max_image_tokens)
    name = Path(args.image).stem
    out = args.out or Path(f"plan_{name}_{args.max_image_tokens}.png")
    title = f"{name}: {summary.replace(', s=', chr(10) + 's=', 1)}"
    draw(image, plan, processor, title, out)
    print(f"{name}: {summary}\nwrote {out}")
    return plan


def draw_several(args, processor: NanoVLMImageProcessor) -> list[ImagePlan]:
    """A prompt's images planned together (`plan_sample`), one panel each."""
    images = [read_image(name) for name in args.image]
    plans = processor.plan_sample([(image.height, image.width) for image in images])
    names = [Path(name).stem for name in args.image]
    summaries = [describe(plan, image.height, image.width, args.max_image_tokens)
                 for plan, image in zip(plans, images)]
    budget = args.max_image_tokens_per_sample
    total = sum(plan.num_tokens for plan in plans)
    title = (f"{len(images)} images, {total} tokens of a per-sample budget of {budget}"
             if budget is not None else f"{len(images)} images, {total} tokens")
    titles = [f"{name}: {summary.split(', s=')[0]}\ns={summary.split(', s=')[1]}"
              for name, summary in zip(names, summaries)]
    out = args.out or Path(f"plan_{'_'.join(names)}_{budget or args.max_image_tokens}.png")
    draw_sample(images, plans, processor, titles, title, out)
    print("\n".join(f"{name}: {summary}" for name, summary in zip(names, summaries)))
    print(f"{title}\nwrote {out}")
    return plans


if __name__ == "__main__":
    main()
