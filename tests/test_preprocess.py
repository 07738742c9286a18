"""The fast input pipeline: pixels against a float reference, reduced-scale JPEG decoding, uint8 transport normalised
by the model (also after a Hub-style export), and DataLoader workers that change nothing but speed."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

import processing.image_loading as image_loading
from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer, tiny_config
from modeling_nanovlm.modeling_nanovlm import normalize_pixels
from processing import NanoVLMImageProcessor, NanoVLMProcessor, load_image
from processing.training.trainer import default_dataloader_workers

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


pytestmark = pytest.mark.usefixtures("one_thread")


def jpeg(pixels: np.ndarray, orientation: int | None = None, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def photo(width: int, height: int, name: str = "astronaut") -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(getattr(data, name)()).resize((width, height), Image.BICUBIC))


def reference_patches(image, ip: NanoVLMImageProcessor) -> tuple[np.ndarray, list]:
    """The float reference: full decode, PIL bicubic resize to the plan, float64 normalisation, then patchify."""
    rgb = load_image(image)
    plan = ip.plan(rgb.height, rgb.width)
    resized = np.asarray(rgb.resize((plan.resized_width, plan.resized_height), Image.BICUBIC), dtype=np.float64)
    normalised = (resized / 255.0 - MEAN) / STD
    p = ip.patch_size
    patches = normalised.reshape(plan.grid_height, p, plan.grid_width, p, 3).transpose(0, 2, 4, 1, 3)
    return patches.reshape(plan.num_patches, 3 * p * p), [plan.grid_height, plan.grid_width]


def levels(normalised: np.ndarray) -> np.ndarray:
    """Normalised patches back to 0-255 levels (channel-first inside each patch)."""
    p2 = normalised.shape[1] // 3
    return (normalised.reshape(len(normalised), 3, p2) * STD[:, None] + MEAN[:, None]) * 255.0


# --- pixels ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, budget", [((640, 480), 1024), ((1024, 768), 256), ((333, 500), 64), ((56, 40), 1024)])
def test_pixels_match_the_float_reference(size, budget):
    """Same plans as a full decode + PIL resize + float64 normalisation; pixels within resampling tolerance."""
    pixels = photo(*size, name="coffee")
    for source in (jpeg(pixels), pixels, Image.fromarray(pixels)):
        ip = NanoVLMImageProcessor(max_image_tokens=budget)
        out = ip(source)
        reference, grid = reference_patches(source, ip)
        assert out["image_grid_hw"].tolist() == [grid]
        assert out["pixel_values"].dtype == np.float32 and out["pixel_values"].shape == reference.shape
        difference = np.abs(levels(out["pixel_values"]) - levels(reference))
        # torch's antialiased uint8 resize is PIL's filter, with its own rounding between the two 1-D passes: a few
        # levels at most (where an image is shrunk one way and grown the other), a small fraction of one on average
        assert difference.max() <= 4.01 and difference.mean() < 0.3, (difference.max(), difference.mean())


def test_a_kept_size_is_not_resampled():
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ip = NanoVLMImageProcessor(pixel_dtype="uint8")
    assert (ip.plan(48, 64).resized_height, ip.plan(48, 64).resized_width) == (48, 64)
    patches = ip(pixels)["pixel_values"]
    expected = pixels.reshape(3, 16, 4, 16, 3).transpose(0, 2, 4, 1, 3).reshape(12, 768)
    np.testing.assert_array_equal(patches, expected)  # the exact bytes: no resize, no rounding


def test_torch_and_pil_resizes_agree(monkeypatch):
    """Without torch the processor resizes in PIL; both give the same plan and pixels within rounding."""
    source = jpeg(photo(900, 600))
    with_torch = NanoVLMImageProcessor(max_image_tokens=256, pixel_dtype="uint8")(source)["pixel_values"]
    monkeypatch.setattr(image_loading, "torch", None)
    with_pil = NanoVLMImageProcessor(max_image_tokens=256, pixel_dtype="uint8")(source)["pixel_values"]
    assert with_torch.shape == with_pil.shape
    difference = np.abs(with_torch.astype(int) - with_pil.astype(int))
    assert int(difference.max()) <= 4 and float(difference.mean()) < 0.3


def test_lanczos_and_other_filters_still_use_pil():
    source = photo(300, 200)
    ip = NanoVLMImageProcessor(max_image_tokens=16, resample=Image.LANCZOS, pixel_dtype="uint8")
    plan = ip.plan(200, 300)
    expected = np.asarray(Image.fromarray(source).resize((plan.resized_width, plan.resized_height), Image.LANCZOS))
    p = 16
    expected = expected.reshape(plan.grid_height, p, plan.grid_width, p, 3).transpose(0, 2, 4, 1, 3)
    np.testing.assert_array_equal(ip(source)["pixel_values"], expected.reshape(plan.num_patches, -1))


# --- reduced-scale JPEG decoding ----------------------------------------------------------------------------------


def draft_calls(monkeypatch) -> list:
    calls = []
    original = Image.Image.draft

    def spy(self, mode, size):
        calls.append((self.size, size))
        return original(self, mode, size)

    monkeypatch.setattr(Image.Image, "draft", spy)
    from PIL import JpegImagePlugin

    original_jpeg = JpegImagePlugin.JpegImageFile.draft

    def spy_jpeg(self, mode, size):
        calls.append((self.size, size))
        return original_jpeg(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy_jpeg)
    return calls


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_full_size_plan(monkeypatch):
    data = jpeg(photo(2400, 1600))
    calls = draft_calls(monkeypatch)
    settings = dict(max_image_tokens=64, max_image_size=512)
    plan = NanoVLMImageProcessor(**settings).plan(1600, 2400)
    assert (plan.resized_width, plan.resized_height) == (512, 320)
    reduced = NanoVLMImageProcessor(**settings)(data)
    full = NanoVLMImageProcessor(**settings, reduced_jpeg_decode=False)(data)
    assert calls == [((2400, 1600), (600, 400))]  # 1/4 scale: each side still >= the planned 512 x 320
    assert reduced["image_grid_hw"].tolist() == full["image_grid_hw"].tolist() == [[20, 32]]
    difference = np.abs(levels(reduced["pixel_values"]) - levels(full["pixel_values"]))
    # DCT-domain downscaling then bicubic vs bicubic from full size: close, not bit-equal
    assert difference.mean() < 1.5 and np.percentile(difference, 99) < 12, (difference.mean(), difference.max())


def test_no_reduced_decode_below_2x_or_for_inexact_scales(monkeypatch):
    calls = draft_calls(monkeypatch)
    NanoVLMImageProcessor(max_image_tokens=1024)(jpeg(photo(1024, 768)))  # plan 1024x768: no downscale
    NanoVLMImageProcessor(max_image_tokens=64, max_image_size=128)(jpeg(photo(451, 300)))  # 451 is odd: no exact 1/2
    assert calls == []
    assert image_loading._exact_draft_scale((3000, 2000), (1024, 672)) == 2
    assert image_loading._exact_draft_scale((3000, 2000), (256, 176)) == 8
    assert image_loading._exact_draft_scale((3000, 2002), (256, 176)) == 2  # 2002 is not a multiple of 4 or 8


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_reduced_decode_keeps_exif_orientation(orientation, monkeypatch):
    """Stored 1600x640, left half red, right half blue, with an EXIF orientation; decoded at 1/4 scale."""
    stored = np.zeros((640, 1600, 3), np.uint8)
    stored[:, :800] = (255, 0, 0)
    stored[:, 800:] = (0, 0, 255)
    data = jpeg(stored, orientation)
    ip = NanoVLMImageProcessor(max_image_tokens=40, max_image_size=400, pixel_dtype="uint8")
    calls = draft_calls(monkeypatch)
    out = ip(data)
    assert calls == [((1600, 640), (400, 160))]  # the stored orientation's size, at 1/4 scale
    upright = load_image(data)  # full decode, EXIF applied
    plan = ip.plan(upright.height, upright.width)
    assert out["image_grid_hw"].tolist() == [[plan.grid_height, plan.grid_width]]
    expected = np.asarray(upright.resize((plan.resized_width, plan.resized_height), Image.BICUBIC)).astype(int)
    p = 16
    got = out["pixel_values"].reshape(plan.grid_height, plan.grid_width, 3, p, p).transpose(0, 3, 1, 4, 2)
    got = got.reshape(plan.resized_height, plan.resized_width, 3).astype(int)
    assert np.abs(got - expected).mean() < 2  # the colours are where a full decode puts them
    if orientation in (6, 8):
        assert plan.resized_height > plan.resized_width


def test_encoded_datasets_images_are_decoded_by_the_processor(processor):
    """`datasets.Image(decode=False)` rows carry {"bytes", "path"}: the processor decodes them itself (at reduced
    scale where the plan allows, in the DataLoader's workers when there are some) and gets the same pixels."""
    datasets = pytest.importorskip("datasets")
    data = jpeg(photo(320, 240, "rocket"))
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None}]},
                                         features=datasets.Features({"image": datasets.Image(decode=False)}))
    encoded = dataset[0]["image"]
    assert isinstance(encoded, dict) and encoded["bytes"] == data
    decoded = dataset.cast_column("image", datasets.Image())[0]["image"]
    ip = processor.image_processor
    np.testing.assert_array_equal(ip(encoded)["pixel_values"], ip(decoded)["pixel_values"])
    assert load_image(encoded).size == (320, 240)
    with pytest.raises(ValueError, match="got dict"):
        ip({"bytes": None, "path": None})


# --- uint8 transport ----------------------------------------------------------------------------------------------


def test_uint8_transport_is_the_resized_bytes_and_is_saved(tmp_path):
    source = jpeg(photo(640, 480))
    floats = NanoVLMImageProcessor(max_image_tokens=64)(source)["pixel_values"]
    ip = NanoVLMImageProcessor(max_image_tokens=64, pixel_dtype="uint8")
    raw = ip(source, return_tensors="pt")["pixel_values"]
    assert raw.dtype == torch.uint8 and raw.shape == floats.shape and raw.nbytes * 4 == floats.nbytes
    np.testing.assert_allclose(normalize_pixels(raw, MEAN, STD, torch.float32).numpy(), floats, atol=1e-5)

    ip.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["pixel_dtype"] == "uint8"
    assert NanoVLMImageProcessor.from_pretrained(tmp_path).pixel_dtype == "uint8"
    with pytest.raises(ValueError, match="pixel_dtype must be one of"):
        NanoVLMImageProcessor(pixel_dtype="float16")


def test_uint8_and_float_transport_give_the_same_logits(processor, make_tiny_model):
    from skimage import data

    images = [data.astronaut(), data.coffee(), data.chelsea()]
    texts = ["<image> what is this?", "<image> and <image> side by side"]
    float_batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    processor.image_processor.pixel_dtype = "uint8"
    uint8_batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert uint8_batch["pixel_values"].dtype == torch.uint8
    model = make_tiny_model().eval()
    with torch.no_grad():
        expected = model(**float_batch).logits
        got = model(**uint8_batch).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        model.to(torch.bfloat16)  # normalised in float32, then cast to the tower's dtype
        torch.testing.assert_close(model(**uint8_batch).logits.float(), model(**float_batch).logits.float(),
                                   rtol=0.05, atol=0.05)


def test_uint8_without_the_models_mean_and_std_is_a_clear_error(processor, make_tiny_model):
    processor.image_processor.pixel_dtype = "uint8"
    batch = processor(text=["<image> hi"], images=[np.zeros((32, 32, 3), np.uint8)], return_tensors="pt")
    model = make_tiny_model().eval()
    model.config.image_mean = None
    with pytest.raises(ValueError, match="image_mean=None"):
        model(**batch)
    assert normalize_pixels(torch.zeros(2, 768, dtype=torch.uint8), MEAN, STD, torch.bfloat16).dtype == torch.bfloat16


def test_uint8_transport_survives_the_hub_export(tmp_path):
    """Remote-code processor and model in a fresh process (the repository unimportable): uint8 in, same logits."""
    from offline_tokenizer import build_tokenizer
    from test_export import run_fresh

    tokenizer = build_tokenizer(["what is in the picture? a cat"] * 20)
    processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=32, pixel_dtype="uint8"), tokenizer)
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(
        tiny_config(vocab_size=len(tokenizer), image_token_id=processor.image_token_id)
    ).eval()
    folder = tmp_path / "nanovlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert json.loads((folder / "processor_config.json").read_text())["image_processor"]["pixel_dtype"] == "uint8"
    image = photo(200, 150, "chelsea")
    np.save(tmp_path / "image.npy", image)
    processor.image_processor.pixel_dtype = "float32"
    with torch.no_grad():
        reference = model(**processor(text=["<image> what is in the picture?"], images=[image], return_tensors="pt"))
    torch.save(reference.logits, tmp_path / "logits.pt")
    out = run_fresh(
        f"""
        import numpy as np, torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(folder)!r}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert processor.image_processor.pixel_dtype == "uint8"
        batch = processor(text=["<image> what is in the picture?"], images=[np.load({str(tmp_path / "image.npy")!r})],
                          return_tensors="pt")
        assert batch["pixel_values"].dtype == torch.uint8
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(**batch).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "logits.pt")!r}), rtol=1e-5, atol=1e-5)
        print("same logits")
        """,
        cwd=tmp_path,
    )
    assert "same logits" in out


# --- DataLoader workers -------------------------------------------------------------------------------------------


def test_default_workers_rule(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [default_dataloader_workers(cpus) for cpus in (1, 2, 3, 4, 8, 64)] == [0, 0, 2, 3, 4, 4]
    assert default_dataloader_workers(16, processes_per_node=8) == 0  # 2 CPUs each
    assert default_dataloader_workers(32, processes_per_node=4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_dataloader_workers(12) == 2


def photo_rows(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        width, height = int(rng.integers(48, 200)), int(rng.integers(48, 200))
        rows.append({"image": jpeg(photo(width, height, ("coffee", "chelsea", "rocket")[index % 3])),
                     "prompt": "what is in the picture?", "answer": ("a cup", "a cat on a rug", "a rocket")[index % 3]})
    return rows


def workers_trainer(output_dir, rows, tokenizer, workers: int, pixel_dtype="float32", **overrides):
    processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=16, max_image_size=128,
                                                       pixel_dtype=pixel_dtype), tokenizer)
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(
        tiny_config(vocab_size=len(tokenizer), image_token_id=processor.image_token_id)
    )
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=2e-3, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    dataloader_num_workers=workers)
    settings.update(overrides)
    return NanoVLMTrainer(model=model, args=TrainingArguments(**settings), train_dataset=rows,
                          processing_class=processor, auto_workers=False)


def losses(trainer) -> dict:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_batches_and_losses_are_the_same_with_workers(tmp_path, tokenizer):
    rows = photo_rows(8)
    serial = workers_trainer(tmp_path / "w0", rows, tokenizer, 0, max_steps=3)
    parallel = workers_trainer(tmp_path / "w2", rows, tokenizer, 2, max_steps=3)
    serial_batches, parallel_batches = list(serial.get_train_dataloader()), list(parallel.get_train_dataloader())
    assert _num_workers(parallel.get_train_dataloader()) == 2
    assert len(serial_batches) == len(parallel_batches) == 4
    for a, b in zip(serial_batches, parallel_batches):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    serial.train()
    parallel.train()
    assert sorted(losses(serial)) == [1, 2, 3]
    assert losses(parallel) == losses(serial)  # exactly
    for name, value in serial.model.state_dict().items():
        assert torch.equal(parallel.model.state_dict()[name], value), name


def test_resume_with_workers_repeats_the_uninterrupted_run(tmp_path, tokenizer):
    rows = photo_rows(8)
    settings = dict(max_steps=5, save_strategy="steps", save_steps=3)
    uninterrupted = workers_trainer(tmp_path / "full", rows, tokenizer, 2, pixel_dtype="uint8", **settings)
    uninterrupted.train()
    resumed = workers_trainer(tmp_path / "resumed", rows, tokenizer, 2, pixel_dtype="uint8", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    expected, got = losses(uninterrupted), losses(resumed)
    for step in (4, 5):
        assert got[step] == pytest.approx(expected[step], rel=1e-5)
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_trainer_picks_workers_when_left_at_the_default(tmp_path, tokenizer, monkeypatch):
    import processing.training.trainer as trainer_module

    rows = photo_rows(4)
    monkeypatch.setattr(trainer_module, "default_dataloader_workers", lambda: 2)
    trainer = workers_trainer(tmp_path, rows, tokenizer, 0, max_steps=1)
    trainer.auto_workers = True
    assert _num_workers(trainer.get_train_dataloader()) == 2
    trainer.auto_workers = False  # the user's 0 kept
    assert _num_workers(trainer.get_train_dataloader()) == 0
    explicit = workers_trainer(tmp_path, rows, tokenizer, 1, max_steps=1)
    explicit.auto_workers = True
    assert _num_workers(explicit.get_train_dataloader()) == 1  # a nonzero setting is used as given


def _num_workers(dataloader) -> int:
    """Workers of a dataloader prepared by accelerate (a DataLoaderShard is a DataLoader with the same settings)."""
    return dataloader.num_workers


def test_trainer_refuses_uint8_pixels_for_a_model_with_other_mean_and_std(tmp_path, processor, make_tiny_model):
    from transformers import TrainingArguments

    from modeling_nanovlm import NanoVLMTrainer

    processor.image_processor.pixel_dtype = "uint8"
    model = make_tiny_model()
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    NanoVLMTrainer(model=model, args=args, processing_class=processor)  # same mean/std: accepted
    model.config.image_std = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="image_mean/image_std"):
        NanoVLMTrainer(model=model, args=args, processing_class=processor)
