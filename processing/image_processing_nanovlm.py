"""Dynamic-resolution image processor for nanoVLM.

The processor owns the token plan: for an image of height x width it decides the resized size, the
patch grid, the pixel-shuffle factor and the token grid, from (height, width) and the budget alone.
Samplers, collators and the model all read this plan; none of them re-derives it.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

CONNECTOR_MODES = ("shuffle", "perceiver")


class ImageInputError(ValueError):
    """An image could not be read or is not usable (empty, corrupt, too large, not an image).

    `image_index` is the position of the image in the call that failed (None when unknown).
    """

    def __init__(self, message: str, image_index: int | None = None):
        super().__init__(message)
        self.image_index = image_index


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
    """The token plan for one image of `height` x `width` pixels (see design.md, "The plan").

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
    if max_image_tokens < 1:
        raise ValueError(f"max_image_tokens must be >= 1, got {max_image_tokens}")
    if connector not in CONNECTOR_MODES:
        raise ValueError(f"connector must be one of {CONNECTOR_MODES}, got {connector!r}")
    factors = (1,) if connector == "perceiver" else tuple(sorted(shuffle_factors))
    if not factors or any(int(s) != s or s < 1 for s in factors):
        raise ValueError(f"shuffle_factors must be positive integers, got {shuffle_factors!r}")
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


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode to RGB: EXIF orientation applied, transparency composited on `background`."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """HWC / CHW / HW arrays, uint8 in [0, 255] or float in [0, 1], to a PIL image."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageInputError(f"cannot read an array of shape {array.shape} as an image (HW, HWC or CHW)")
    if array.dtype != np.uint8:
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise ImageInputError(
                f"image array holds {int(np.isnan(array).sum())} NaN and {int(np.isinf(array).sum())} infinite values"
            )
        if array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def load_image(image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB PIL image from a PIL image, numpy array, torch tensor, path or bytes.

    Raises `ImageInputError` for anything that is not a usable image: empty, corrupt, beyond PIL's
    decompression-bomb limit, or not an image at all.
    """
    if isinstance(image, (str, os.PathLike, bytes)):
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        try:
            with Image.open(source) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)  # a loaded copy that outlives the file
        except Image.DecompressionBombError as error:
            raise ImageInputError(f"image is larger than PIL's decompression-bomb limit: {error}") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageInputError(f"cannot decode image: {error}") from error
    elif type(image).__module__.startswith("torch"):
        image = _array_to_pil(image.detach().cpu().numpy())
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise ImageInputError(f"expected a PIL image, array, tensor, path or bytes, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageInputError(f"image has zero size ({width}x{height})")
    if Image.MAX_IMAGE_PIXELS is not None and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        raise ImageInputError(
            f"image of {width}x{height} pixels is beyond PIL's decompression-bomb limit "
            f"({2 * Image.MAX_IMAGE_PIXELS} pixels); resize it first or raise PIL.Image.MAX_IMAGE_PIXELS"
        )
    return _to_rgb(image, background)


def _header_orientation(image: Image.Image) -> int:
    """EXIF orientation where the format keeps it in the header; PIL would decode a PNG to find its eXIf chunk."""
    return image.getexif().get(0x0112, 1) if image.format in ("JPEG", "MPO", "TIFF", "WEBP") else 1


def image_size(image) -> tuple[int, int]:
    """(height, width) of an image without decoding its pixels where possible (paths, bytes, PIL)."""
    if isinstance(image, (str, os.PathLike, bytes)):
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        try:
            with Image.open(source) as opened:
                width, height = opened.size
                orientation = _header_orientation(opened)
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageInputError(f"cannot read image header: {error}") from error
        return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    if isinstance(image, Image.Image):
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
        return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    width, height = load_image(image).size
    return height, width


class NanoVLMImageProcessor(BaseImageProcessor):
    r"""Resizes each image to its own plan (aspect kept, under the image-token budget) and flattens it to patches.

    Outputs (per batch of N images, P patches in all):
        pixel_values          (P, 3 * patch_size**2)  patches in row-major order, image after image
        image_grid_hw         (N, 2)  patch grid of each image
        image_token_hw        (N, 2)  token grid of each image (tokens = product)
        image_shuffle_factor  (N,)    pixel-shuffle factor of each image

    Every plan field can be overridden per call: `processor(images, max_image_tokens=256)`. With
    `snap_sizes` (and `snap_aspect_ratios`) images snap to a few exact shapes, one per bucket (see `plan_image`).
    """

    model_input_names = ["pixel_values", "image_grid_hw", "image_token_hw", "image_shuffle_factor"]
    plan_fields = (
        "patch_size",
        "max_image_tokens",
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
        snap_aspect_ratios: list[float] | None = None,
        image_mean: list[float] | tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        image_std: list[float] | tuple[float, ...] = IMAGENET_DEFAULT_STD,
        resample: int = PILImageResampling.BICUBIC,
        background_color: list[int] | tuple[int, ...] = (255, 255, 255),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_image_tokens = max_image_tokens
        self.max_image_size = max_image_size
        self.shuffle_factors = sorted(int(s) for s in shuffle_factors)
        self.connector = connector
        self.perceiver_latents = perceiver_latents
        self.snap_sizes = list(snap_sizes) if snap_sizes else None
        self.snap_aspect_ratios = list(snap_aspect_ratios) if snap_aspect_ratios else None
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.resample = int(resample)
        self.background_color = list(background_color)
        self.plan(self.max_image_size, self.max_image_size)  # fail at construction on a bad setting

    def plan(self, height: int, width: int, **overrides) -> ImagePlan:
        """The plan for an image of `height` x `width`; keyword overrides replace config fields for this call."""
        unknown = set(overrides) - set(self.plan_fields)
        if unknown:
            raise TypeError(f"unknown plan setting(s) {sorted(unknown)}; valid: {list(self.plan_fields)}")
        settings = {name: getattr(self, name) for name in self.plan_fields}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("shuffle_factors", "snap_sizes", "snap_aspect_ratios"):
            settings[name] = tuple(settings[name]) if settings[name] else None
        return plan_image(int(height), int(width), **settings)

    def num_image_tokens(self, height: int, width: int, **overrides) -> int:
        """Exact number of image tokens for an image of `height` x `width` (no pixels needed)."""
        return self.plan(height, width, **overrides).num_tokens

    def _pixels(self, image: Image.Image, plan: ImagePlan) -> np.ndarray:
        """Resized, normalised (C, H, W) float32 pixels flattened to (patches, C * p * p) in row-major order."""
        resized = image.resize((plan.resized_width, plan.resized_height), resample=self.resample)
        pixels = np.asarray(resized, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        p = self.patch_size
        patches = pixels.reshape(plan.grid_height, p, plan.grid_width, p, 3).transpose(0, 2, 4, 1, 3)
        return patches.reshape(plan.num_patches, 3 * p * p)

    def preprocess(self, images, return_tensors=None, **overrides) -> BatchFeature:
        """Plan, resize, normalise and patchify a list of images (or one image)."""
        if images is None:
            raise ImageInputError("no images given")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if images and isinstance(images[0], (list, tuple)):
            images = [image for sample in images for image in sample]
        pixel_chunks, grids, token_grids, factors = [], [], [], []
        for index, raw in enumerate(images):
            try:
                image = load_image(raw, tuple(self.background_color))
            except ImageInputError as error:
                raise ImageInputError(f"image {index}: {error}", image_index=index) from error
            plan = self.plan(image.height, image.width, **overrides)
            pixel_chunks.append(self._pixels(image, plan))
            grids.append((plan.grid_height, plan.grid_width))
            token_grids.append((plan.token_height, plan.token_width))
            factors.append(plan.shuffle_factor)
        data = {
            "pixel_values": np.concatenate(pixel_chunks) if pixel_chunks else np.zeros((0, 3 * self.patch_size**2), np.float32),
            "image_grid_hw": np.asarray(grids, dtype=np.int64).reshape(-1, 2),
            "image_token_hw": np.asarray(token_grids, dtype=np.int64).reshape(-1, 2),
            "image_shuffle_factor": np.asarray(factors, dtype=np.int64),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images, return_tensors=None, **overrides) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def to_dict(self):
        output = super().to_dict()
        output.pop("_valid_kwargs_names", None)
        return output


__all__ = ["NanoVLMImageProcessor", "ImagePlan", "ImageInputError", "plan_image", "load_image", "image_size"]
