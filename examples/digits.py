"""The built-in task: scikit-learn's real 8x8 digits on canvases of random size and aspect ratio.

Each sample is one digit, upscaled (bilinear) to `digit_min`..`digit_max` pixels and pasted at a random
place on a canvas whose height and width are drawn independently (so the aspect ratio varies too: a
dynamic-resolution task). The question is always "Which digit is shown and where?" and the answer is the
digit and the quadrant of the canvas that holds the digit's centre, e.g. "7 top-left".

- The split is fixed (it does not depend on the run's seed): 20 % of each class, 360 of the 1797
  digits, is held out and never trained on.
- Digits are never centred within `margin` pixels of a midline, so every quadrant is unambiguous.
- Everything about a sample (canvas size, digit size, place, noise) is a pure function of
  (seed, epoch, index), and canvas sizes are known without rendering (`canvas_size`), so a bucketing
  sampler can plan batches from sizes alone. `set_epoch` draws new layouts (the same digits).
- A curriculum limits the canvas side per epoch (`side_schedule`): small square canvases first, then the
  largest side grows to `max_side`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

QUESTION = "Which digit is shown and where?"
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
NUM_DIGITS = 1797
NUM_HELD_OUT = 360
SPLIT_SEED = 0


def load_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": (images, labels)}: images (N, 8, 8) float32 in [0, 1].

    A fixed stratified split (the same on every run and seed): 36 digits of each class are held out.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    rng = np.random.RandomState(SPLIT_SEED)
    held_out = np.zeros(len(labels), dtype=bool)
    per_class = NUM_HELD_OUT // 10
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        held_out[rng.choice(members, per_class, replace=False)] = True
    return {
        "train": (images[~held_out], labels[~held_out]),
        "test": (images[held_out], labels[held_out]),
    }


@dataclass(frozen=True)
class Layout:
    """Where one digit goes: canvas (height, width), digit side, top-left corner of the digit."""

    height: int
    width: int
    size: int
    top: int
    left: int

    @property
    def quadrant(self) -> str:
        centre_y, centre_x = self.top + self.size / 2, self.left + self.size / 2
        vertical = "top" if centre_y < self.height / 2 else "bottom"
        horizontal = "left" if centre_x < self.width / 2 else "right"
        return f"{vertical}-{horizontal}"


def _place(rng: np.random.Generator, side: int, size: int, margin: int, upper: bool) -> int:
    """Top (or left) of a `size` digit on a `side` canvas, its centre >= `margin` px from the midline."""
    low, high = size / 2, side / 2 - margin  # centre range for the upper / left half
    if upper:
        centre = rng.uniform(low, max(low, high))
    else:
        centre = rng.uniform(min(side - low, side / 2 + margin), side - low)
    return int(np.clip(round(centre - size / 2), 0, side - size))


def sample_layout(
    rng: np.random.Generator,
    min_side: int,
    max_side: int,
    digit_min: int,
    digit_max: int,
    margin: int,
    quadrant: int | None = None,
) -> Layout:
    """A random layout: canvas sides independently in [min_side, max_side], a digit in a random quadrant."""
    height = int(rng.integers(min_side, max_side + 1))
    width = int(rng.integers(min_side, max_side + 1))
    # the digit must fit in one half with its centre `margin` px past the midline
    largest = max(1, min(digit_max, height - 2 * margin, width - 2 * margin))
    size = int(rng.integers(min(digit_min, largest), largest + 1))
    quadrant = int(rng.integers(4)) if quadrant is None else quadrant
    top = _place(rng, height, size, margin, upper=quadrant < 2)
    left = _place(rng, width, size, margin, upper=quadrant % 2 == 0)
    return Layout(height, width, size, top, left)


NOISE_BANK_SIDE = 512  # canvases take a random crop of one fixed Gaussian texture: rendering stays cheap


def _noise_bank(side: int) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((side, side), dtype=np.float32)


_BANKS: dict[int, np.ndarray] = {}


def render(digit: np.ndarray, layout: Layout, rng: np.random.Generator, noise: float = 0.02) -> Image.Image:
    """An RGB canvas with `digit` (8x8 in [0, 1]) pasted as light ink on a dark, slightly noisy background.

    The background level, ink strength and the crop of the noise texture are drawn from `rng`.
    """
    background = rng.uniform(0.0, 0.15)
    ink = rng.uniform(0.75, 1.0)
    height, width = layout.height, layout.width
    canvas = np.full((height, width), background, dtype=np.float32)
    glyph = Image.fromarray(digit.astype(np.float32), mode="F").resize((layout.size, layout.size), Image.BILINEAR)
    glyph = np.clip(np.asarray(glyph), 0.0, 1.0) * np.float32(ink)
    window = canvas[layout.top : layout.top + layout.size, layout.left : layout.left + layout.size]
    np.maximum(window, glyph, out=window)
    if noise > 0:
        side = max(NOISE_BANK_SIDE, height, width)
        bank = _BANKS.get(side)
        if bank is None:
            bank = _BANKS.setdefault(side, _noise_bank(side))
        top, left = int(rng.integers(side - height + 1)), int(rng.integers(side - width + 1))
        canvas += bank[top : top + height, left : left + width] * np.float32(noise)
    np.clip(canvas, 0.0, 1.0, out=canvas)
    pixels = (canvas * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").convert("RGB")


def answer_text(label: int, layout: Layout) -> str:
    return f"{int(label)} {layout.quadrant}"


_ANSWER = re.compile(r"([0-9])\D*?(top|bottom)\s*-?\s*(left|right)", re.IGNORECASE)


def parse_answer(text: str) -> tuple[int | None, str | None]:
    """(digit, quadrant) read from generated text; None for a part that cannot be read."""
    match = _ANSWER.search(text)
    if match:
        return int(match.group(1)), f"{match.group(2).lower()}-{match.group(3).lower()}"
    digit = re.search(r"[0-9]", text)
    return (int(digit.group(0)) if digit else None), None


class DigitsTask:
    """Digits on canvases as a map-style dataset of {"image", "prompt", "answer"} rows.

    `side_schedule(epoch) -> (min_side, max_side)` gives the canvas range of each epoch (a curriculum);
    without one every epoch uses (min_side, max_side). `repeats` shows each digit that many times per
    epoch, each time with its own layout. Layouts are drawn from (seed, epoch, index) alone.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        seed: int = 0,
        min_side: int = 128,
        max_side: int = 384,
        digit_min: int = 64,
        digit_max: int = 96,
        margin: int = 16,
        noise: float = 0.02,
        repeats: int = 1,
        side_schedule=None,
        limit: int | None = None,
    ):
        self.images = images
        self.labels = labels
        self.seed = int(seed)
        self.min_side, self.max_side = int(min_side), int(max_side)
        self.digit_min, self.digit_max = int(digit_min), int(digit_max)
        self.margin = int(margin)
        self.noise = float(noise)
        self.repeats = int(repeats)
        self.side_schedule = side_schedule
        self.length = len(labels) * self.repeats if limit is None else min(int(limit), len(labels) * self.repeats)
        self.epoch = 0
        self._layouts = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's layouts (deterministic in (seed, epoch)); sizes change, digits do not."""
        self.epoch = int(epoch)
        if self.side_schedule is not None:
            low, high = self.side_schedule(self.epoch)
        else:
            low, high = self.min_side, self.max_side
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        # balanced quadrants: a shuffled cycle over the four
        quadrants = rng.permutation(np.arange(self.length) % 4)
        self._layouts = [
            sample_layout(rng, low, high, self.digit_min, self.digit_max, self.margin, int(quadrants[i]))
            for i in range(self.length)
        ]

    def __len__(self) -> int:
        return self.length

    def digit_index(self, index: int) -> int:
        return index % len(self.labels)

    def layout(self, index: int) -> Layout:
        return self._layouts[index]

    def canvas_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample `index` this epoch, without rendering it."""
        layout = self._layouts[index]
        return layout.height, layout.width

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every sample this epoch, without rendering."""
        return [(layout.height, layout.width) for layout in self._layouts]

    def sizes_for_epoch(self, epoch: int) -> list[tuple[int, int]]:
        """Move to `epoch` (`set_epoch`: new layouts) and return its canvas sizes.

        For `BucketBatchSampler(task.sizes(), ..., sizes_for_epoch=task.sizes_for_epoch)`: the sampler re-plans
        at every epoch from the sizes of the layouts the task then renders.
        """
        self.set_epoch(epoch)
        return self.sizes()

    def label(self, index: int) -> int:
        return int(self.labels[self.digit_index(index)])

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        layout = self._layouts[index]
        rng = np.random.default_rng([self.seed, self.epoch, 2, index])
        digit = self.digit_index(index)
        return {
            "image": render(self.images[digit], layout, rng, self.noise),
            "prompt": QUESTION,
            "answer": answer_text(self.labels[digit], layout),
        }


def tokenizer_corpus() -> list[str]:
    """Texts the offline tokenizer is trained on: the question and every possible answer."""
    answers = [f"{digit} {quadrant}" for digit in range(10) for quadrant in QUADRANTS]
    return [QUESTION, "user", "assistant", *answers] * 4


__all__ = [
    "QUESTION",
    "QUADRANTS",
    "Layout",
    "DigitsTask",
    "load_split",
    "sample_layout",
    "render",
    "answer_text",
    "parse_answer",
    "tokenizer_corpus",
]
