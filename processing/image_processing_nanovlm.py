"""Dynamic-resolution image processor for nanoVLM.

The processor owns the token plan: for an image of height x width it decides the resized size, the
patch grid, the pixel-shuffle factor and the token grid, from (height, width) and the budget alone.
Samplers, collators and the model all read this plan; none of them re-derives it. Reading the images (any input,
EXIF, reduced JPEG decode, resizing) is `image_loading.py`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from transformers.utils.versions import require_version

# Remote code runs under the Hub user's transformers: name the release it needs (the model's
# configuration_nanovlm.py and setup.cfg state the same range; tests/test_versions.py holds them equal).
TRANSFORMERS_REQUIREMENT = "transformers>=5.24,<6"
require_version(TRANSFORMERS_REQUIREMENT, f"nanoVLM's processor needs it: pip install '{TRANSFORMERS_REQUIREMENT}'")

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature  # noqa: E402
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling  # noqa: E402

from .image_loading import ImageInputError, OpenedImage, resize_rgb  # noqa: E402

CONNECTOR_MODES = ("shuffle", "perceiver")
PIXEL_DTYPES = ("float32", "uint8")
# The settings a model's weights fix (patch embedding, connector, projections, normalisation): a processor built for
# a model takes them from its config (`NanoVLMImageProcessor.from_model_config`) instead of repeating them.
MODEL_SETTINGS = ("patch_size", "connector", "shuffle_factors", "perceiver_latents", "image_mean", "image_std")


@dataclass(frozen=True)
class ImagePlan:
    """What the processor does to one image, and how many LM tokens it becomes.

    `grid_*` is the tower's patch grid (resized side / patch size). `token_*` is the grid of image
    tokens the LM sees: (grid / shuffle_factor), average-pooled further when the budget requires it.
    For the Perceiver connector the token grid is (1, number of latents).
    """

    resized_height: int
    resized_width: int
    grid_height: int
    grid_width: int
    shuffle_factor: int
    token_height: int
    token_width: int

    @property
    def num_tokens(self) -> int:
        return self.token_height * self.token_width

    @property
    def num_patches(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def pooled(self) -> bool:
        s = self.shuffle_factor
        return (self.token_height * s, self.token_width * s) != (self.grid_height, self.grid_width)


def _fit_side(side: float, step: int, max_side: int) -> int:
    """Nearest multiple of `step` to `side`, at least one step and at most `max_side`."""
    largest = (max_side // step) * step
    return min(max(step, round(side / step) * step), largest)


def _pooled_grid(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """Largest (rows', cols') <= (rows, cols) with about the same aspect and rows' * cols' <= budget."""
    scale = math.sqrt(budget / (rows * cols))
    if rows * scale < 1:  # a very wide image: one row, as many columns as the budget allows
        return 1, min(cols, budget)
    if cols * scale < 1:  # a very tall image: one column, as many rows as the budget allows
        return min(rows, budget), 1
    pooled_rows = min(rows, max(1, math.floor(rows * scale + 1e-9)))
    pooled_cols = min(cols, max(1, math.floor(cols * scale + 1e-9)), budget // pooled_rows)
    return pooled_rows, pooled_cols


def _nearest_on_log_scale(value: float, choices) -> float:
    return min(choices, key=lambda choice: abs(math.log(choice / value)))


def _snapped(height: float, width: float, sizes, aspect_ratios) -> tuple[float, float]:
    """(height, width) moved to the nearest listed long side and (optionally) width/height ratio."""
    aspect = width / height
    if aspect_ratios:
        aspect = _nearest_on_log_scale(aspect, aspect_ratios)
    long_side = _nearest_on_log_scale(max(height, width), sizes)
    return (long_side / aspect, long_side) if aspect >= 1 else (long_side, long_side * aspect)


def check_plan_settings(
    *,
    patch_size: int,
    max_image_tokens: int,
    max_image_size: int,
    shuffle_factors,
    connector: str,
    perceiver_latents: int,
) -> tuple[int, ...]:
    """The shuffle factors a plan may choose from, sorted; a `ValueError` for settings no plan can follow.

    `NanoVLMConfig` checks `connector` and `shuffle_factors` with the same rules and messages (the model package
    cannot import this one; tests/test_plan.py holds the two to the same answers).
    """
    if max_image_tokens < 1:
        raise ValueError(f"max_image_tokens must be >= 1, got {max_image_tokens}")
    if connector not in CONNECTOR_MODES:
        raise ValueError(f"connector must be one of {CONNECTOR_MODES}, got {connector!r}")
    if not shuffle_factors or any(int(s) != s or s < 1 for s in shuffle_factors):
        raise ValueError(f"shuffle_factors must be positive integers, got {shuffle_factors!r}")
    factors = (1,) if connector == "perceiver" else tuple(sorted(int(s) for s in shuffle_factors))
    if max_image_size < patch_size * factors[-1]:
        raise ValueError(
            f"max_image_size={max_image_size} is smaller than one token cell "
            f"(patch_size {patch_size} x largest shuffle factor {factors[-1]})"
        )
    if connector == "perceiver" and perceiver_latents > max_image_tokens:
        raise ValueError(
            f"the Perceiver connector gives {perceiver_latents} tokens per image, "
            f"more than max_image_tokens={max_image_tokens}"
        )
    return factors


def plan_image(
    height: int,
    width: int,
    *,
    patch_size: int = 16,
    max_image_tokens: int = 1024,
    max_image_size: int = 2048,
    shuffle_factors: tuple[int, ...] = (1, 2, 4),
    connector: str = "shuffle",
    perceiver_latents: int = 64,
    snap_sizes: tuple[int, ...] | None = None,
    snap_aspect_ratios: tuple[float, ...] | None = None,
) -> ImagePlan:
    """The token plan for one image of `height` x `width` pixels (see docs/architecture.md, "The data path").

    - aspect kept: each side is rounded to a multiple of patch_size * s (one rounding step at most);
    - the long side is at most `max_image_size`; tiny images grow to at least one token;
    - the smallest factor s whose token grid fits `max_image_tokens` is chosen; if none fits, the
      largest s is used and the token grid is average-pooled to the largest same-aspect grid that fits.

    Snapping (opt-in, for bucketed training): with `snap_sizes` the long side is first moved to the nearest
    listed size and, with `snap_aspect_ratios`, width/height to the nearest listed ratio (both nearest on a
    log scale), so every image of a bucket gets one exact shape and the tower runs once per batch. This
    trades up to one bucket step of scale and aspect for speed.
    """
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))) or height < 1 or width < 1:
        raise ImageInputError(f"image size must be positive integers, got height={height!r}, width={width!r}")
    factors = check_plan_settings(
        patch_size=patch_size, max_image_tokens=max_image_tokens, max_image_size=max_image_size,
        shuffle_factors=shuffle_factors, connector=connector, perceiver_latents=perceiver_latents,
    )
    scale = min(1.0, max_image_size / max(height, width))
    target_h, target_w = height * scale, width * scale
    if snap_sizes:
        target_h, target_w = _snapped(target_h, target_w, snap_sizes, snap_aspect_ratios)
    for s in factors:
        step = patch_size * s
        resized_h = _fit_side(target_h, step, max_image_size)
        resized_w = _fit_side(target_w, step, max_image_size)
        grid_h, grid_w = resized_h // patch_size, resized_w // patch_size
        if connector == "perceiver":
            return ImagePlan(resized_h, resized_w, grid_h, grid_w, 1, 1, perceiver_latents)
        if (grid_h // s) * (grid_w // s) <= max_image_tokens:
            return ImagePlan(resized_h, resized_w, grid_h, grid_w, s, grid_h // s, grid_w // s)
    token_h, token_w = _pooled_grid(grid_h // s, grid_w // s, max_image_tokens)
    return ImagePlan(resized_h, resized_w, grid_h, grid_w, s, token_h, token_w)


def check_sample_budget(budget, num_images: int) -> int:
    """`max_image_tokens_per_sample` as an int; a `ValueError` for one that is not a positive integer or that cannot
    give each of `num_images` images one token."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"max_image_tokens_per_sample must be a positive integer (or None), got {budget!r}")
    if budget < 1:
        raise ValueError(f"max_image_tokens_per_sample must be >= 1, got {budget}")
    if budget < num_images:
        raise ValueError(
            f"max_image_tokens_per_sample={budget} cannot give each of its {num_images} images one token; "
            f"raise it to at least {num_images} or send fewer images"
        )
    return int(budget)


def plan_images(
    sizes,
    *,
    max_image_tokens_per_sample: int | None = None,
    max_image_tokens: int = 1024,
    **settings,
) -> list[ImagePlan]:
    """The plans of one sample's images, from their (height, width) list: one token budget shared by all of them.

    Without `max_image_tokens_per_sample` every image is planned alone (`plan_image`). With it, the images share it
    by water-filling over per-image caps: every image gets the same cap c (at most `max_image_tokens`), the largest
    whose plans sum to at most the budget, so an image that needs fewer tokens than c leaves the rest to the others.
    What is still left then goes to the first images in order, one cap step each while the sum fits: caps
    (c + 1, ..., c + 1, c, ..., c). Both steps are one binary search over the position k in the sequence of cap
    vectors cap_i(k) = k // n + (i < k % n), along which every cap, and so (plans being monotone in the cap)
    every image's tokens, only grows: a larger budget never gives an image fewer tokens. Pure, deterministic, no
    pixels. `settings` are `plan_image`'s.
    """
    sizes = [tuple(size) for size in sizes]
    cache = {}

    def plan(index: int, cap: int) -> ImagePlan:  # equal sizes are planned once
        key = (sizes[index], cap)
        if key not in cache:
            cache[key] = plan_image(*sizes[index], max_image_tokens=cap, **settings)
        return cache[key]

    full = [plan(index, max_image_tokens) for index in range(len(sizes))]
    if max_image_tokens_per_sample is None:
        return full
    budget = check_sample_budget(max_image_tokens_per_sample, len(sizes))
    total = sum(p.num_tokens for p in full)
    if total <= budget:
        return full
    if settings.get("connector", "shuffle") == "perceiver":  # a fixed count per image: no cap lowers it
        raise ValueError(
            f"the Perceiver connector gives {full[0].num_tokens} tokens per image, so {len(sizes)} images need "
            f"{total}, more than max_image_tokens_per_sample={budget}"
        )
    n = len(sizes)

    def caps(k: int) -> list[int]:
        return [k // n + (i < k % n) for i in range(n)]

    def fits(k: int) -> bool:
        return sum(plan(i, cap).num_tokens for i, cap in enumerate(caps(k))) <= budget

    low, high = n, n * max_image_tokens  # every cap 1 (one token each, fits: budget >= n) / every cap the maximum
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return [plan(i, cap) for i, cap in enumerate(caps(low))]


def _images_per_sample(images) -> list[list]:
    """Images as one list per sample: one list per sample as given, or each image of a flat list (or one image
    alone) as its own sample."""
    if not isinstance(images, (list, tuple)):
        return [[images]]
    nested = [isinstance(group, (list, tuple)) for group in images]
    if any(nested) and not all(nested):
        raise ImageInputError(
            "images mixes lists and single images: give a flat list of images, or one list of images per sample"
        )
    return [list(group) for group in images] if images and all(nested) else [[image] for image in images]


def _model_settings(config) -> dict:
    """`MODEL_SETTINGS` as `config` sets them.

    `config` is a `NanoVLMConfig`, read by attribute: processing never imports the model.

    A config without image_mean / image_std leaves them out."""
    settings = {
        "patch_size": int(config.vision_config.patch_size),
        "connector": config.connector,
        "shuffle_factors": sorted(int(s) for s in config.shuffle_factors),
        "perceiver_latents": int(config.perceiver_latents),
    }
    for name in ("image_mean", "image_std"):
        if getattr(config, name, None) is not None:
            settings[name] = [float(value) for value in getattr(config, name)]
    return settings


def _same_setting(ours, theirs) -> bool:
    """Equal as settings: factor lists in any order, mean / std to float precision."""
    if isinstance(theirs, list) and theirs and isinstance(theirs[0], float):
        return len(ours) == len(theirs) and bool(np.allclose(ours, theirs))
    if isinstance(theirs, list):
        return sorted(ours) == theirs
    return ours == theirs


# Per-call (and saved) pixel settings, as transformers' image processors name them.
PIXEL_SETTINGS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
# transformers' other image kwargs (`ImagesKwargs`): the plan decides each image's size, so these are refused when
# set (None means "the default" there, and is let through).
UNUSED_IMAGE_KWARGS = (
    "do_resize", "size", "default_to_square", "crop_size", "resample", "do_pad", "pad_size", "do_center_crop",
    "data_format", "input_data_format", "device", "disable_grouping", "image_seq_length", "do_convert_rgb",
)


class NanoVLMImageProcessor(BaseImageProcessor):
    r"""Resizes each image to its own plan (aspect kept, under the image-token budget) and flattens it to patches.

    Outputs (per batch of N images, P patches in all):
        pixel_values          (P, 3 * patch_size**2)  patches in row-major order, image after image
        image_grid_hw         (N, 2)  patch grid of each image
        image_token_hw        (N, 2)  token grid of each image (tokens = product)
        image_shuffle_factor  (N,)    pixel-shuffle factor of each image

    Every plan field can be overridden per call: `processor(images, max_image_tokens=256)`. With
    `snap_sizes` (and `snap_aspect_ratios`) images snap to a few exact shapes, one per bucket (see `plan_image`).
    With `max_image_tokens_per_sample` the images of one sample share that many tokens (`plan_images`): give
    `images` as one list per sample; a flat list is planned image by image, each its own sample.

    `pixel_dtype` chooses how pixels travel to the model:
        "float32" (default)  normalised with `image_mean` / `image_std` here;
        "uint8"              the resized RGB bytes, 4x fewer bytes through the DataLoader, pinned memory and the
                             host-to-device copy; the model normalises them on its own device with its config's
                             `image_mean` / `image_std` (which must equal this processor's).
    `reduced_jpeg_decode` (default True): a JPEG path or bytes whose plan shrinks it 2x or more is decoded at 1/2,
    1/4 or 1/8 scale (never below the planned size; `PIL.Image.draft`) before the resize: most of a large photo's
    decode time saved, pixels within resampling tolerance of a full decode. The plan always comes from the
    image's full size.
    """

    model_input_names = ["pixel_values", "image_grid_hw", "image_token_hw", "image_shuffle_factor"]
    plan_fields = (
        "patch_size",
        "max_image_tokens",
        "max_image_tokens_per_sample",
        "max_image_size",
        "shuffle_factors",
        "connector",
        "perceiver_latents",
        "snap_sizes",
        "snap_aspect_ratios",
    )

    def __init__(
        self,
        patch_size: int = 16,
        max_image_tokens: int = 1024,
        max_image_size: int = 2048,
        shuffle_factors: list[int] | tuple[int, ...] = (1, 2, 4),
        connector: str = "shuffle",
        perceiver_latents: int = 64,
        snap_sizes: list[int] | None = None,
        max_image_tokens_per_sample: int | None = None,
        snap_aspect_ratios: list[float] | None = None,
        image_mean: list[float] | tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        image_std: list[float] | tuple[float, ...] = IMAGENET_DEFAULT_STD,
        resample: int = PILImageResampling.BICUBIC,
        background_color: list[int] | tuple[int, ...] = (255, 255, 255),
        pixel_dtype: str = "float32",
        reduced_jpeg_decode: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_image_tokens = max_image_tokens
        self.max_image_tokens_per_sample = max_image_tokens_per_sample
        self.max_image_size = max_image_size
        self.shuffle_factors = list(shuffle_factors)
        self.connector = connector
        self.perceiver_latents = perceiver_latents
        self.snap_sizes = list(snap_sizes) if snap_sizes else None
        self.snap_aspect_ratios = list(snap_aspect_ratios) if snap_aspect_ratios else None
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.resample = int(resample)
        self.background_color = list(background_color)
        if pixel_dtype not in PIXEL_DTYPES:
            raise ValueError(f"pixel_dtype must be one of {PIXEL_DTYPES}, got {pixel_dtype!r}")
        self.pixel_dtype = pixel_dtype
        self.reduced_jpeg_decode = bool(reduced_jpeg_decode)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(
                f"image_mean and image_std need one value per RGB channel (std > 0), "
                f"got {self.image_mean}, {self.image_std}"
            )
        self.plan(self.max_image_size, self.max_image_size)  # fail at construction on a bad setting
        self.shuffle_factors = sorted(int(s) for s in self.shuffle_factors)  # integers: the plan just checked

    @classmethod
    def from_model_config(cls, config, **kwargs) -> NanoVLMImageProcessor:
        """An image processor for the model `config` describes (a `NanoVLMConfig`, e.g. `model.config`).

        The settings the model's weights fix (`MODEL_SETTINGS`: patch_size, connector, shuffle_factors,
        perceiver_latents, image_mean, image_std) come from `config`; `kwargs` give the rest (`max_image_tokens`,
        `max_image_size`, `snap_sizes`, `pixel_dtype`, ...). Repeating a model setting with another value is an
        error: change the model config instead.

            image_processor = NanoVLMImageProcessor.from_model_config(model.config, max_image_tokens=256)
        """
        settings = _model_settings(config)
        different = [name for name in settings if name in kwargs and not _same_setting(kwargs[name], settings[name])]
        if different:
            raise ValueError(
                "these settings come from the model config and differ from it: "
                + ", ".join(f"{name}={kwargs[name]!r} (model: {settings[name]!r})" for name in different)
                + "; leave them out, or build the model with them"
            )
        return cls(**{**kwargs, **settings})

    def check_model_config(self, config) -> None:
        """A `ValueError` naming every setting in which this processor's plans do not fit `config`'s model.

        The model would refuse them at its first forward; `NanoVLMTrainer` calls this when it is built, so the
        mismatch shows before any data is read. Shuffle factors need a projection each, and pooling happens at the
        largest factor, which must be the model's largest; uint8 pixels are normalised with the model's
        image_mean/image_std, so those must be this processor's.
        """
        model = _model_settings(config)
        problems = []
        if self.patch_size != model["patch_size"]:
            problems.append(f"patch_size {self.patch_size} (the tower's is {model['patch_size']})")
        if self.connector != model["connector"]:
            problems.append(f"connector {self.connector!r} (the model's is {model['connector']!r})")
        elif self.connector == "perceiver" and self.perceiver_latents != model["perceiver_latents"]:
            problems.append(f"perceiver_latents {self.perceiver_latents} (the model's is {model['perceiver_latents']})")
        elif self.connector == "shuffle" and (
            not set(self.shuffle_factors) <= set(model["shuffle_factors"])
            or max(self.shuffle_factors) != max(model["shuffle_factors"])
        ):
            problems.append(
                f"shuffle_factors {self.shuffle_factors} (the model has projections for {model['shuffle_factors']})"
            )
        if self.pixel_dtype == "uint8" and not all(
            name in model and _same_setting(getattr(self, name), model[name]) for name in ("image_mean", "image_std")
        ):
            problems.append(
                f"pixel_dtype='uint8' pixels are normalised by the model with its image_mean/image_std "
                f"({getattr(config, 'image_mean', None)}, {getattr(config, 'image_std', None)}), but this processor's "
                f"are ({self.image_mean}, {self.image_std})"
            )
        if problems:
            raise ValueError(
                "the image processor does not fit the model: " + "; ".join(problems) + ". Build it from the model: "
                "NanoVLMImageProcessor.from_model_config(model.config, max_image_tokens=...)"
            )

    def plan_settings(self, **overrides) -> dict:
        """The plan fields of this processor with `overrides` (None values ignored) replacing them for one call."""
        unknown = set(overrides) - set(self.plan_fields)
        if unknown:
            raise TypeError(f"unknown plan setting(s) {sorted(unknown)}; valid: {list(self.plan_fields)}")
        fixed = [name for name in MODEL_SETTINGS if overrides.get(name) is not None
                 and not _same_setting(overrides[name], getattr(self, name))]
        if fixed:
            raise ValueError(
                f"{', '.join(f'{name}={overrides[name]!r}' for name in fixed)} per call: the model's weights fix "
                f"{'these' if len(fixed) > 1 else 'this'}, a call cannot change {'them' if len(fixed) > 1 else 'it'}. "
                "Build the processor from the model's config: NanoVLMImageProcessor.from_model_config(model.config, "
                "max_image_tokens=...); per call, change the budget(s), max_image_size, snapping or pixel settings"
            )
        settings = {name: getattr(self, name) for name in self.plan_fields}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        settings["shuffle_factors"] = tuple(settings["shuffle_factors"])
        for name in ("snap_sizes", "snap_aspect_ratios"):
            settings[name] = tuple(settings[name]) if settings[name] else None
        return settings

    def plan(self, height: int, width: int, **overrides) -> ImagePlan:
        """The plan for an image of `height` x `width`, as a sample of its own (a per-sample budget then caps it
        alone); keyword overrides replace config fields for this call. Plan the images of a sample together with
        `plan_sample`."""
        return self.plan_sample([(height, width)], **overrides)[0]

    def plan_sample(self, sizes, **overrides) -> list[ImagePlan]:
        """The plans of one sample's images from their (height, width) list: they share `max_image_tokens_per_sample`
        when it is set (see `plan_images`). Exact, deterministic, no pixels."""
        sizes = [(int(height), int(width)) for height, width in sizes]
        return plan_images(sizes, **self.plan_settings(**overrides))

    def num_image_tokens(self, height: int, width: int, **overrides) -> int:
        """Exact number of image tokens for an image of `height` x `width` (no pixels needed)."""
        return self.plan(height, width, **overrides).num_tokens

    def num_image_tokens_per_sample(self, sizes, **overrides) -> list[int]:
        """Exact image tokens of each image of one sample (their (height, width) list), planned together."""
        return [plan.num_tokens for plan in self.plan_sample(sizes, **overrides)]

    def _opened(self, raw) -> OpenedImage:
        """One input image opened, its pixels decoded only where the plan cannot use a reduced JPEG decode."""
        return OpenedImage.open(raw, self.reduced_jpeg_decode)

    def _decoded(self, opened: OpenedImage, plan: ImagePlan) -> Image.Image:
        """The opened image decoded for its plan, upright and RGB."""
        return opened.decode((plan.resized_height, plan.resized_width), tuple(self.background_color))

    def _resized(self, opened: OpenedImage, plan: ImagePlan) -> np.ndarray:
        """One opened image at its planned size: (3, H, W) uint8 pixels."""
        return resize_rgb(self._decoded(opened, plan), (plan.resized_height, plan.resized_width), self.resample)

    def _patches(self, pixels: np.ndarray, plan: ImagePlan) -> np.ndarray:
        """(3, H, W) uint8 pixels to (patches, 3 * p * p) uint8: patches row-major, each one channel-first."""
        p = self.patch_size
        patches = pixels.reshape(3, plan.grid_height, p, plan.grid_width, p).transpose(1, 3, 0, 2, 4)
        return patches.reshape(plan.num_patches, 3 * p * p)

    def _normalized(self, chunks: list[np.ndarray], pixels: dict) -> np.ndarray:
        """uint8 patches to float32 `(x * rescale_factor - mean) / std` (by default `(x / 255 - mean) / std`), each
        step as `pixels` (`_pixel_settings`) asks.

        One multiply into the output array, one subtract in place."""
        p2 = self.patch_size**2
        factor = pixels["rescale_factor"] if pixels["do_rescale"] else 1.0
        std = np.asarray(pixels["image_std"] if pixels["do_normalize"] else (1.0, 1.0, 1.0), np.float64)
        mean = np.asarray(pixels["image_mean"] if pixels["do_normalize"] else (0.0, 0.0, 0.0), np.float64)
        scale = np.repeat(factor / std, p2).astype(np.float32)
        shift = np.repeat(mean / std, p2).astype(np.float32)
        out = np.empty((sum(len(chunk) for chunk in chunks), 3 * p2), np.float32)
        start = 0
        for chunk in chunks:
            rows = out[start : start + len(chunk)]
            np.multiply(chunk, scale, out=rows)
            rows -= shift
            start += len(chunk)
        return out

    def _pixel_settings(self, overrides: dict) -> dict:
        """This call's rescale / normalise settings (`PIXEL_SETTINGS`), taken out of `overrides`; the rest of
        transformers' image kwargs (`size`, `crop_size`, `do_pad`, ...) would fight the plan, so they are errors."""
        given = {name: overrides.pop(name) for name in PIXEL_SETTINGS if overrides.get(name, None) is not None}
        for name in PIXEL_SETTINGS:
            overrides.pop(name, None)
        # None is transformers' "the default"; images always become RGB here
        ignored = {
            name
            for name, value in overrides.items()
            if name in UNUSED_IMAGE_KWARGS and (value is None or (name == "do_convert_rgb" and value))
        }
        for name in ignored:
            overrides.pop(name)
        refused = sorted(set(overrides) & set(UNUSED_IMAGE_KWARGS))
        if refused:
            raise TypeError(
                f"nanoVLM's image processor does not take {refused}: each image's size comes from its plan; set "
                f"the plan's fields instead ({list(self.plan_fields)})"
            )
        if given and self.pixel_dtype == "uint8":
            raise ValueError(
                f"{sorted(given)} given with pixel_dtype='uint8': the model rescales and normalises uint8 pixels "
                "itself, with its config's image_mean / image_std; use pixel_dtype='float32' to set them per call"
            )
        settings = {**{name: getattr(self, name) for name in PIXEL_SETTINGS}, **given}
        if len(settings["image_mean"]) != 3 or len(settings["image_std"]) != 3 or min(settings["image_std"]) <= 0:
            raise ValueError(
                f"image_mean and image_std need one value per RGB channel (std > 0), "
                f"got {settings['image_mean']}, {settings['image_std']}"
            )
        return settings

    def preprocess(self, images, return_tensors=None, **overrides) -> BatchFeature:
        """Plan, resize and patchify images; rescale and normalise them unless `pixel_dtype="uint8"`.

        `images`: one image, a flat list (each image its own sample), or one list per sample, whose images are
        planned together (they share `max_image_tokens_per_sample`). Outputs are flat, image after image.
        `overrides` may set plan fields and `PIXEL_SETTINGS` for this call.
        """
        overrides = dict(overrides)
        pixel_settings = self._pixel_settings(overrides)
        if images is None:
            raise ImageInputError("no images given")
        samples = _images_per_sample(images)
        settings = self.plan_settings(**overrides)
        patch_chunks, grids, token_grids, factors = [], [], [], []
        index = 0  # of the image in the whole call, as errors name it
        for sample, group in enumerate(samples):
            opened = []
            for position, raw in enumerate(group):
                try:
                    opened.append(self._opened(raw))
                except ImageInputError as error:
                    raise ImageInputError(f"image {index + position}: {error}", image_index=index + position) from error
            plans = self._sample_plans(sample, [image.size for image in opened], settings)
            for image, plan in zip(opened, plans):
                try:
                    pixels = self._resized(image, plan)
                except ImageInputError as error:
                    raise ImageInputError(f"image {index}: {error}", image_index=index) from error
                patch_chunks.append(self._patches(pixels, plan))
                grids.append((plan.grid_height, plan.grid_width))
                token_grids.append((plan.token_height, plan.token_width))
                factors.append(plan.shuffle_factor)
                index += 1
        if self.pixel_dtype == "uint8":
            if patch_chunks:
                pixel_values = np.concatenate(patch_chunks)
            else:
                pixel_values = np.zeros((0, 3 * self.patch_size**2), np.uint8)
        else:
            pixel_values = self._normalized(patch_chunks, pixel_settings)
        data = {
            "pixel_values": pixel_values,
            "image_grid_hw": np.asarray(grids, dtype=np.int64).reshape(-1, 2),
            "image_token_hw": np.asarray(token_grids, dtype=np.int64).reshape(-1, 2),
            "image_shuffle_factor": np.asarray(factors, dtype=np.int64),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _sample_plans(sample: int, sizes: list[tuple[int, int]], settings: dict) -> list[ImagePlan]:
        """`plan_images`, its errors naming the sample when its images share a budget."""
        try:
            return plan_images(sizes, **settings)
        except ImageInputError:
            raise
        except ValueError as error:
            if settings.get("max_image_tokens_per_sample") is None:
                raise
            images = f"{len(sizes)} image" + ("s" if len(sizes) != 1 else "")
            raise ValueError(f"sample {sample} ({images}): {error}") from error

    def __call__(self, images, return_tensors=None, **overrides) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def to_dict(self):
        output = super().to_dict()
        output.pop("_valid_kwargs_names", None)
        return output


__all__ = [
    "NanoVLMImageProcessor",
    "PIXEL_DTYPES",
    "PIXEL_SETTINGS",
    "MODEL_SETTINGS",
    "check_plan_settings",
    "ImagePlan",
    "ImageInputError",
    "plan_image",
    "plan_images",
    "check_sample_budget",
]
