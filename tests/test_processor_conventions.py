"""What generic clients pass to any transformers processor, through ours: lmms-eval's empty `videos=[]` / `audios=[]`,
declared video kwargs, the nested kwargs forms, images by URL and base64, both argument orders,
`return_mm_token_type_ids`, per-call rescale / normalise; and what stays an error."""

import base64
import functools
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from processing import ImageInputError, NanoVLMImageProcessor, NanoVLMProcessor

PROMPT = "<image> what is this?"


def noise(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def same(first, second):
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1: (folder, base URL)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_lmms_eval_call_with_empty_videos_and_audios(processor):
    image = noise(64, 96)
    plain = processor(text=[PROMPT], images=[image], return_tensors="pt")
    generic = processor(text=[PROMPT], images=[image], videos=[], audios=[], audio=None, padding=True,
                        return_tensors="pt")
    same(plain, generic)
    for name in ("videos", "audio", "audios"):
        with pytest.raises(ValueError, match=f"images and text only: {name} must be None or empty"):
            processor(text=[PROMPT], images=[image], **{name: [np.zeros((2, 8, 8, 3))]})


def test_declared_video_kwargs_change_nothing_and_misspellings_stay_errors(processor):
    image = noise(64, 96)
    plain = processor(text=[PROMPT], images=[image], return_tensors="pt")
    with_video_kwargs = processor(text=[PROMPT], images=[image], num_frames=2, fps=None, do_sample_frames=True,
                                  videos_kwargs={"return_metadata": True}, return_tensors="pt")
    same(plain, with_video_kwargs)
    with pytest.raises(TypeError, match=r"unknown plan setting\(s\) \['max_image_token'\]"):
        processor(text=[PROMPT], images=[image], max_image_token=16)
    with pytest.raises(TypeError, match=r"unknown plan setting\(s\) \['max_image_token'\]"):
        processor(text=[PROMPT], images=[image], images_kwargs={"max_image_token": 16})
    with pytest.raises(TypeError, match=r"does not take \['size'\].*plan"):
        processor(text=[PROMPT], images=[image], size={"height": 32, "width": 32})


def test_nested_kwargs_forms(processor):
    image = noise(256, 256)
    flat = processor(text=[PROMPT], images=[image], max_image_tokens=4, padding="max_length", max_length=40,
                     return_tensors="pt")
    nested = processor(text=[PROMPT], images=[image], common_kwargs={"return_tensors": "pt"},
                       images_kwargs={"max_image_tokens": 4}, text_kwargs={"padding": "max_length", "max_length": 40})
    same(flat, nested)
    assert (nested["input_ids"] == processor.image_token_id).sum() == 4 and nested["input_ids"].shape[1] == 40
    with pytest.raises(ValueError, match="passed two times"):
        processor(text=[PROMPT], images=[image], max_image_tokens=4, images_kwargs={"max_image_tokens": 4})


def test_images_by_url_and_base64_match_the_image(processor, served):
    folder, base = served
    image = noise(48, 80, 3)
    (folder / "image.png").write_bytes(png_bytes(image))
    encoded = base64.b64encode(png_bytes(image)).decode()
    expected = processor(text=[PROMPT], images=[image], return_tensors="pt")
    for source in (f"{base}/image.png", encoded, f"data:image/png;base64,{encoded}", str(folder / "image.png")):
        same(processor(text=[PROMPT], images=[source], return_tensors="pt"), expected)
    assert processor.num_image_tokens(48, 80) == (expected["input_ids"] == processor.image_token_id).sum()
    with pytest.raises(ImageInputError, match="sample 0, image 0: cannot decode image .*missing.png"):
        processor(text=[PROMPT], images=[f"{base}/missing.png"])
    with pytest.raises(ImageInputError, match="not an existing file, and not a loadable URL or base64"):
        processor(text=[PROMPT], images=["no/such/file.png"])


def test_chat_messages_with_image_urls(processor, served):
    folder, base = served
    image = noise(48, 80, 4)
    (folder / "image.png").write_bytes(png_bytes(image))
    messages = [{"role": "user", "content": [{"type": "image", "url": f"{base}/image.png"},
                                             {"type": "text", "text": "what is this?"}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", processor_kwargs={"num_frames": 2, "fps": None})
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    same(out, processor(text=text, images=[image], return_tensors="pt"))


def test_both_argument_orders(processor):
    image = noise(64, 96)
    expected = processor(text=PROMPT, images=image, return_tensors="pt")
    same(processor(image, PROMPT, return_tensors="pt"), expected)  # transformers 5: images first
    same(processor(PROMPT, image, return_tensors="pt"), expected)  # ours before: text first
    same(processor([image], [PROMPT], return_tensors="pt"), expected)


def test_mm_token_type_ids_mark_the_image_tokens(processor):
    batch = processor(text=[PROMPT, "no image here"], images=[noise(64, 96)], return_mm_token_type_ids=True,
                      return_tensors="pt")
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == processor.image_token_id).long())
    assert batch["mm_token_type_ids"].sum() > 0
    assert "mm_token_type_ids" not in processor(text=[PROMPT], images=[noise(64, 96)])


def test_rescale_and_normalise_per_call_and_saved(tokenizer, tmp_path):
    image = noise(32, 32)
    processor = NanoVLMProcessor(image_processor=NanoVLMImageProcessor(), tokenizer=tokenizer)
    raw = processor(text=[PROMPT], images=[image], do_rescale=False, do_normalize=False, return_tensors="pt")
    pixels = raw["pixel_values"]
    assert pixels.max() > 1 and torch.equal(pixels, pixels.round())  # the 0-255 values themselves
    halved = processor(text=[PROMPT], images=[image], rescale_factor=0.5, do_normalize=False, return_tensors="pt")
    torch.testing.assert_close(halved["pixel_values"], pixels * 0.5)
    default = processor(text=[PROMPT], images=[image], return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = ((pixels.view(-1, 3, 256) / 255 - mean[:, None]) / std[:, None]).view_as(pixels)
    torch.testing.assert_close(default, expected)

    processor.image_processor.do_normalize = False
    processor.save_pretrained(tmp_path)
    assert NanoVLMProcessor.from_pretrained(tmp_path).image_processor.do_normalize is False

    uint8 = NanoVLMProcessor(image_processor=NanoVLMImageProcessor(pixel_dtype="uint8"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pixel_dtype='uint8'"):
        uint8(text=[PROMPT], images=[image], rescale_factor=0.5)
