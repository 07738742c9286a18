"""Reading images for nanoVLM's image processor: a PIL image, array, tensor, path, bytes, URL, base64 string or
encoded `datasets` image to RGB pixels, EXIF orientation applied, a JPEG decoded at reduced scale when its plan
allows, resized in torch's uint8 kernels. Clear `ImageInputError`s for anything that is not a usable image.

Exported with the image processor (a flat sibling it imports relatively); the token plan is not here.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps
from transformers.image_utils import PILImageResampling
from transformers.image_utils import load_image as transformers_load_image
from transformers.utils import is_torch_available

if is_torch_available():
    import torch
else:  # the processor works without torch; resizing then runs in PIL
    torch = None


class ImageInputError(ValueError):
    """An image could not be read or is not usable (empty, corrupt, too large, not an image).

    `image_index` is the position of the image in the call that failed (None when unknown).
    """

    def __init__(self, message: str, image_index: int | None = None):
        super().__init__(message)
        self.image_index = image_index


@dataclass
class OpenedImage:
    """One input image between reading its size and resizing it: opened (a JPEG that may still be decoded at
    reduced scale) or decoded already, with its stored size and EXIF orientation."""

    image: Image.Image
    opened_here: bool
    decoded: bool
    stored_size: tuple[int, int]  # (width, height) as stored, before any reduced decode
    orientation: int

    @classmethod
    def open(cls, raw, reduced_jpeg_decode: bool = True) -> OpenedImage:
        """`raw` opened, with its upright size: what planning needs before any pixel is resized.

        A JPEG path or bytes stays undecoded (its orientation is in the header), so that `decode` may still decode
        it at reduced scale once its plan is known; anything else is decoded here, as its orientation may need it.
        """
        opened, opened_here = _open_image(raw)
        stored_size = opened.size
        _check_size(*stored_size)
        if opened_here and reduced_jpeg_decode and opened.format in ("JPEG", "MPO"):
            return cls(opened, opened_here, False, stored_size, _orientation(opened))
        decoded = _decode(opened, opened_here)
        return cls(decoded, opened_here, True, stored_size, _orientation(decoded))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) upright: what the plan is computed from."""
        return _upright_size(self.stored_size, self.orientation)

    def decode(self, size: tuple[int, int], background: tuple[int, int, int]) -> Image.Image:
        """The image decoded (a JPEG at the smallest exact scale that keeps `size` = (height, width), the size it
        will be resized to), turned upright (EXIF) and converted to RGB."""
        image = self.image
        if not self.decoded:
            height, width = size
            target = (height, width) if self.orientation in _QUARTER_TURNS else (width, height)  # as stored
            scale = _exact_draft_scale(self.stored_size, target)
            if scale > 1:
                stored_width, stored_height = self.stored_size
                image.draft(None, (stored_width // scale, stored_height // scale))
            image = _decode(image, self.opened_here)
        return _to_rgb(_upright(image, self.orientation), background)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode to RGB (the image itself when it is RGB already), transparency composited on `background`.

    EXIF orientation is left to the caller.
    """
    if image.mode == "RGB":
        return image
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


def _is_remote_or_base64(image) -> bool:
    """A URL or a base64 string (with or without a `data:image/...;base64,` prefix): anything a string can be
    but an existing file."""
    if not isinstance(image, str):
        return False
    return image.startswith(("http://", "https://", "data:image/")) or not os.path.isfile(image)


def _load_with_transformers(image: str) -> Image.Image:
    """A URL or base64 string loaded by transformers' own `load_image`, as transformers' processors load them (so
    they come back as RGB with EXIF orientation applied, transparency dropped the way transformers drops it)."""
    try:
        return transformers_load_image(image)
    except Exception as error:  # httpx's network errors, PIL's decode errors, transformers' ValueError
        shown = image if len(image) <= 80 else image[:77] + "..."
        raise ImageInputError(
            f"cannot decode image {shown!r}: not an existing file, and not a loadable URL or base64 image ({error})"
        ) from error


def _open_image(image) -> tuple[Image.Image, bool]:
    """(PIL image, opened here) for a PIL image, numpy array, torch tensor, path, bytes, URL or base64 string.

    Paths and bytes are only opened (header read, pixels not decoded), so the caller can still ask the JPEG decoder
    for a reduced scale (`Image.draft`) before decoding. A `datasets` image entry left encoded
    (`datasets.Image(decode=False)`: {"bytes", "path"}) is read as its bytes, else its path.
    """
    if isinstance(image, dict) and set(image) <= {"bytes", "path"} and (image.get("bytes") or image.get("path")):
        image = image.get("bytes") or image["path"]
    if _is_remote_or_base64(image):
        return _load_with_transformers(image), True
    if isinstance(image, (str, os.PathLike, bytes)):
        try:
            return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image), True
        except Image.DecompressionBombError as error:
            raise ImageInputError(f"image is larger than PIL's decompression-bomb limit: {error}") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageInputError(f"cannot decode image: {error}") from error
    if type(image).__module__.startswith("torch"):
        return _array_to_pil(image.detach().cpu().numpy()), True
    if isinstance(image, np.ndarray):
        return _array_to_pil(image), True
    if not isinstance(image, Image.Image):
        raise ImageInputError(
            f"expected a PIL image, array, tensor, path, bytes, URL or base64 string, got {type(image).__name__}"
        )
    return image, False


def _check_size(width: int, height: int):
    if width < 1 or height < 1:
        raise ImageInputError(f"image has zero size ({width}x{height})")
    if Image.MAX_IMAGE_PIXELS is not None and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        raise ImageInputError(
            f"image of {width}x{height} pixels is beyond PIL's decompression-bomb limit "
            f"({2 * Image.MAX_IMAGE_PIXELS} pixels); resize it first or raise PIL.Image.MAX_IMAGE_PIXELS"
        )


def _decode(image: Image.Image, opened_here: bool) -> Image.Image:
    """Decode the pixels of an image `_open_image` returned; the file of a path is closed either way."""
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"image is larger than PIL's decompression-bomb limit: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"cannot decode image: {error}") from error
    finally:
        if opened_here and getattr(image, "fp", None) is not None and getattr(image, "_exclusive_fp", False):
            image.fp.close()
    return image


# EXIF orientation: read by `_orientation`, applied by `_upright_size` (sizes) and `_upright` (pixels), nowhere else.
_QUARTER_TURNS = (5, 6, 7, 8)  # orientations that swap width and height


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1-8; 1 when there is none), read without decoding the pixels: a PNG's eXIf chunk belongs
    before its pixel data, where PIL reads it on opening (asked for more, PIL would decode the whole image)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def _upright_size(stored_size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(height, width) of an image stored as (width, height), once turned upright."""
    width, height = stored_size
    return (width, height) if orientation in _QUARTER_TURNS else (height, width)


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """The decoded image turned upright: a transposed copy without the orientation tag, or the image itself."""
    return image if orientation == 1 else ImageOps.exif_transpose(image)


def load_image(image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB PIL image, EXIF orientation applied, from a PIL image, numpy array, torch tensor, path, bytes or an
    encoded `datasets` image entry ({"bytes", "path"}).

    Raises `ImageInputError` for anything that is not a usable image: empty, corrupt, beyond PIL's
    decompression-bomb limit, or not an image at all.
    """
    opened, opened_here = _open_image(image)
    _check_size(*opened.size)
    decoded = _decode(opened, opened_here)
    return _to_rgb(_upright(decoded, _orientation(decoded)), background)


def image_size(image) -> tuple[int, int]:
    """(height, width) of an image without decoding its pixels where possible (paths, bytes, PIL)."""
    if isinstance(image, (str, os.PathLike, bytes)) and not _is_remote_or_base64(image):
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        try:
            with Image.open(source) as opened:
                return _upright_size(opened.size, _orientation(opened))
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageInputError(f"cannot read image header: {error}") from error
    if isinstance(image, Image.Image):
        return _upright_size(image.size, _orientation(image))
    width, height = load_image(image).size
    return height, width


def _exact_draft_scale(stored_size: tuple[int, int], target_size: tuple[int, int]) -> int:
    """The largest JPEG decode scale 1/s (s in 8, 4, 2) that keeps each side >= the target and divides it exactly.

    An exact division keeps the reduced image's geometry that of the full one (no partial last row or column);
    1 means a full decode.
    """
    (width, height), (target_width, target_height) = stored_size, target_size
    for scale in (8, 4, 2):
        if (
            width % scale == 0
            and height % scale == 0
            and width // scale >= target_width
            and height // scale >= target_height
        ):
            return scale
    return 1


# PIL filters that torch's antialiased uint8 kernels reproduce: the same filter, with its own rounding between the two
# 1-D passes (a few levels at most, a small fraction of a level on average; tests/test_preprocess.py).
_TORCH_FILTERS = {int(PILImageResampling.BICUBIC): "bicubic", int(PILImageResampling.BILINEAR): "bilinear"}


def resize_rgb(image: Image.Image, size: tuple[int, int], resample: int) -> np.ndarray:
    """An RGB image resized to `size` = (height, width) as (3, height, width) uint8 pixels.

    Bicubic and bilinear run in torch's antialiased uint8 kernels when torch is installed (several times faster
    than PIL's on one core); other filters, and machines without torch, use PIL. No resize when the size is kept.
    """
    height, width = size
    if (image.height, image.width) != (height, width) and (torch is None or resample not in _TORCH_FILTERS):
        image = image.resize((width, height), resample=resample)
    pixels = np.asarray(image).transpose(2, 0, 1)  # a channel-first view, no copy
    if pixels.shape[1:] == (height, width):
        return pixels
    with warnings.catch_warnings():  # PIL's pixels are read-only; interpolate only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        batch = torch.from_numpy(pixels).unsqueeze(0)
    resized = torch.nn.functional.interpolate(
        batch, size=(height, width), mode=_TORCH_FILTERS[resample], antialias=True
    )
    return resized[0].numpy()
