"""Image inputs: every PIL mode to RGB, EXIF orientation, arrays and tensors, bad inputs with clear errors,
and real photos that ship offline through the processor and the tiny model."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image, ImageFile

from processing import ImageInputError, NanoVLMImageProcessor, image_size, load_image

BLUE = (0, 0, 255)


def png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_kwargs)
    return buffer.getvalue()


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (6, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((5, 3), 1)
    if transparent:
        image.info["transparency"] = 0
    return image


# (name, image, top-left pixel on a blue background, bottom-right pixel)
MODES = [
    ("RGB", Image.new("RGB", (6, 4), (10, 20, 30)), (10, 20, 30), (10, 20, 30)),
    ("L", Image.new("L", (6, 4), 77), (77, 77, 77), (77, 77, 77)),
    ("1 white", Image.new("1", (6, 4), 1), (255, 255, 255), (255, 255, 255)),
    ("1 black", Image.new("1", (6, 4), 0), (0, 0, 0), (0, 0, 0)),
    ("RGBA transparent", Image.new("RGBA", (6, 4), (255, 0, 0, 0)), BLUE, BLUE),
    ("RGBA opaque", Image.new("RGBA", (6, 4), (255, 0, 0, 255)), (255, 0, 0), (255, 0, 0)),
    ("RGBA half", Image.new("RGBA", (6, 4), (255, 0, 0, 128)), (128, 0, 127), (128, 0, 127)),
    ("LA transparent", Image.new("LA", (6, 4), (100, 0)), BLUE, BLUE),
    ("LA opaque", Image.new("LA", (6, 4), (100, 255)), (100, 100, 100), (100, 100, 100)),
    ("P transparency", palette_image(True), BLUE, (200, 100, 50)),
    ("P opaque", palette_image(False), (10, 20, 30), (200, 100, 50)),
    ("CMYK", Image.new("CMYK", (6, 4), (0, 255, 255, 0)), (255, 0, 0), (255, 0, 0)),
    ("I;16 max", Image.fromarray(np.full((4, 6), 65535, np.uint16)), (255, 255, 255), (255, 255, 255)),
    ("I;16 half", Image.new("I;16", (6, 4), 32768), (127, 127, 127), (127, 127, 127)),
    ("I 8-bit range", Image.new("I", (6, 4), 200), (200, 200, 200), (200, 200, 200)),
    ("I 16-bit range", Image.new("I", (6, 4), 65535), (255, 255, 255), (255, 255, 255)),
    ("F unit range", Image.new("F", (6, 4), 0.5), (127, 127, 127), (127, 127, 127)),
    ("F 8-bit range", Image.new("F", (6, 4), 128.0), (128, 128, 128), (128, 128, 128)),
]


@pytest.mark.parametrize("name, image, first, last", MODES, ids=[m[0] for m in MODES])
def test_every_mode_converts_to_rgb(name, image, first, last):
    rgb = load_image(image, background=BLUE)
    assert rgb.mode == "RGB" and rgb.size == image.size
    pixels = np.asarray(rgb).astype(int)
    assert np.abs(pixels[0, 0] - first).max() <= 1, pixels[0, 0]
    assert np.abs(pixels[-1, -1] - last).max() <= 1, pixels[-1, -1]


@pytest.mark.parametrize("name", ["RGBA transparent", "LA transparent", "P transparency", "I;16 max", "1 white", "L"])
def test_modes_survive_a_png_file(name, tmp_path):
    image, first, last = next((m[1], m[2], m[3]) for m in MODES if m[0] == name)
    data = png_bytes(image, **({"transparency": 0} if image.mode == "P" and "transparency" in image.info else {}))
    path = tmp_path / "image.png"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        pixels = np.asarray(load_image(source, background=BLUE)).astype(int)
        assert np.abs(pixels[0, 0] - first).max() <= 1 and np.abs(pixels[-1, -1] - last).max() <= 1


def test_image_processor_composites_on_its_background_colour():
    transparent = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    blue = Image.new("RGB", (32, 32), BLUE)
    ip = NanoVLMImageProcessor(background_color=BLUE)
    np.testing.assert_array_equal(ip(transparent)["pixel_values"], ip(blue)["pixel_values"])
    white = NanoVLMImageProcessor()(Image.new("RGB", (32, 32), (255, 255, 255)))["pixel_values"]
    np.testing.assert_array_equal(NanoVLMImageProcessor()(transparent)["pixel_values"], white)


# --- EXIF orientation ----------------------------------------------------------------------------


def jpeg_with_orientation(orientation: int) -> bytes:
    """160 wide x 64 high as stored: left half red, right half blue."""
    pixels = np.zeros((64, 160, 3), np.uint8)
    pixels[:, :80] = (255, 0, 0)
    pixels[:, 80:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    data = jpeg_with_orientation(6)  # displayed rotated 90 degrees clockwise: 64 wide x 160 high, red on top
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    for source in (data, path, Image.open(path)):
        image = load_image(source)
        assert image.size == (64, 160)
        pixels = np.asarray(image).astype(int)
        assert pixels[20, 32, 0] > 200 and pixels[20, 32, 2] < 60  # top: red
        assert pixels[140, 32, 2] > 200 and pixels[140, 32, 0] < 60  # bottom: blue
        assert image_size(source) == (160, 64)  # from the header alone
    ip = NanoVLMImageProcessor(max_image_tokens=1024)
    assert ip(data)["image_grid_hw"].tolist() == [[10, 4]]  # the planned size swaps: 160x64 -> grid 10x4
    assert ip(jpeg_with_orientation(1))["image_grid_hw"].tolist() == [[4, 10]]
    assert ip.num_image_tokens(*image_size(data)) == 40


def test_png_exif_orientation_agrees_between_size_and_pixels(tmp_path, monkeypatch):
    """A PNG's eXIf chunk turns it like a JPEG's EXIF, and `image_size` reads it without decoding the pixels."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg_with_orientation(6))).save(buffer, format="PNG", exif=Image.open(
        io.BytesIO(jpeg_with_orientation(6))).getexif())
    path = tmp_path / "rotated.png"
    path.write_bytes(buffer.getvalue())
    plain = tmp_path / "plain.png"
    Image.new("RGB", (160, 64)).save(plain)
    ip = NanoVLMImageProcessor(max_image_tokens=1024)
    assert ip(path)["image_grid_hw"].tolist() == [[10, 4]]
    assert load_image(path).size == (64, 160)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("image_size decoded the pixels")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert image_size(path) == (160, 64)
    assert image_size(plain) == (64, 160)


def test_exif_orientation_180_keeps_size_and_flips():
    image = load_image(jpeg_with_orientation(3))
    assert image.size == (160, 64)
    pixels = np.asarray(image).astype(int)
    assert pixels[32, 20, 2] > 200 and pixels[32, 140, 0] > 200  # blue now on the left, red on the right


# --- arrays and tensors --------------------------------------------------------------------------


def test_arrays_and_tensors_match_the_pil_image():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    reference = NanoVLMImageProcessor()(Image.fromarray(hwc))["pixel_values"]
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    sources = {
        "numpy HWC uint8": hwc,
        "numpy CHW uint8": chw,
        "numpy HWC float [0,1]": hwc / 255.0,
        "numpy CHW float32 [0,1]": (chw / 255.0).astype(np.float32),
        "numpy HWC float [0,255]": hwc.astype(np.float64),
        "torch CHW float": torch.from_numpy(chw).float() / 255.0,
        "torch HWC uint8": torch.from_numpy(hwc),
        "torch CHW requires_grad": (torch.from_numpy(chw).float() / 255.0).requires_grad_(),
        "bytes": png_bytes(Image.fromarray(hwc)),
    }
    for name, source in sources.items():
        assert load_image(source).size == (56, 40), name
        np.testing.assert_allclose(NanoVLMImageProcessor()(source)["pixel_values"], reference, atol=1e-6, err_msg=name)


def test_grey_and_alpha_arrays():
    grey = np.full((20, 30), 90, np.uint8)
    assert np.asarray(load_image(grey))[0, 0].tolist() == [90, 90, 90]
    assert np.asarray(load_image(grey[..., None]))[0, 0].tolist() == [90, 90, 90]  # HW1
    assert np.asarray(load_image(torch.from_numpy(grey)[None]))[0, 0].tolist() == [90, 90, 90]  # 1HW tensor
    rgba = np.zeros((20, 30, 4), np.uint8)  # fully transparent
    assert np.asarray(load_image(rgba, background=BLUE))[0, 0].tolist() == list(BLUE)


# --- bad inputs: ImageInputError (a ValueError) naming the sample and the image ---------------------


def corrupt_inputs(tmp_path):
    good = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not an image")
    return {
        "garbage bytes": (b"\x89PNG\r\n\x1a\n garbage", "cannot decode image"),
        "empty bytes": (b"", "cannot decode image"),
        "truncated file": (truncated, "cannot decode image"),
        "text file": (str(not_an_image), "cannot decode image"),
        "missing file": (str(tmp_path / "missing.png"), "cannot decode image"),
        "zero-size PIL": (Image.new("RGB", (0, 5)), "zero size"),
        "zero-size array": (np.zeros((0, 5, 3), np.uint8), "zero size"),
        "zero-size tensor": (torch.zeros(3, 5, 0), "zero size"),
        "2-channel array": (np.zeros((10, 10, 2), np.uint8), "cannot read an array"),
        "5-d array": (np.zeros((2, 3, 4, 5, 6)), "cannot read an array"),
        "dict": ({"image": 1}, "got dict"),
        "int": (42, "got int"),
        "None": (None, "got NoneType"),
        "object": (object(), "got object"),
    }


def test_bad_images_raise_clear_errors(tmp_path):
    for name, (bad, message) in corrupt_inputs(tmp_path).items():
        with pytest.raises(ImageInputError, match=message) as info:
            load_image(bad)
        assert isinstance(info.value, ValueError), name


def test_bad_images_name_the_sample_through_the_processor(processor, tmp_path):
    good = np.zeros((32, 48, 3), np.uint8)
    for name, (bad, message) in corrupt_inputs(tmp_path).items():
        with pytest.raises(ImageInputError, match=message) as info:
            processor(text=["<image> first", "second <image> and <image>"], images=[good, good, bad])
        assert "sample 1, image 2" in str(info.value), (name, str(info.value))
        assert info.value.image_index == 2
        with pytest.raises(ImageInputError, match="image 0"):
            processor.image_processor([bad])


def test_decompression_bomb_is_refused(monkeypatch, tmp_path, processor):
    big = Image.new("RGB", (100, 100), (5, 6, 7))  # 10000 pixels
    data = png_bytes(big)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses beyond 2x this: 2000 pixels
    for source in (data, path, big, np.asarray(big), torch.from_numpy(np.asarray(big).copy())):
        with pytest.raises(ImageInputError, match="decompression-bomb"):
            load_image(source)
    with pytest.raises(ImageInputError, match="sample 0, image 0: .*decompression-bomb"):
        processor(text="<image>", images=[data])
    load_image(Image.new("RGB", (40, 40)))  # 1600 pixels: under the limit, accepted


# --- real photos that ship offline -----------------------------------------------------------------


def real_photos():
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "page", "text")}
    for name, image in zip(("china", "flower"), load_sample_images().images):
        photos[name] = image
    return photos


def test_real_photos_through_processor_and_model(processor, tiny_model):
    photos = real_photos()
    assert photos["page"].ndim == 2  # greyscale ones are in the set too
    texts = [f"{name}: <image> what is this?" for name in photos]
    batch = processor(text=texts, images=list(photos.values()), return_tensors="pt")
    expected = [processor.num_image_tokens(*image.shape[:2]) for image in photos.values()]
    assert (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == expected
    assert all(1 <= n <= 64 for n in expected)
    assert batch["image_grid_hw"].max() <= 512 // 16  # max_image_size 512
    with torch.no_grad():
        out = tiny_model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.logits).all()
