"""NanoVLMCollator: labels cover exactly the assistant answers, both row formats, right padding, bad rows."""

import numpy as np
import pytest
import torch

from processing import NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor
from processing.offline_tokenizer import build_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_tokenizer(["Which digit is shown and where? The digit 7, top left. 3 bottom right."] * 20)
    return NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=16, max_image_size=256), tokenizer)


@pytest.fixture(scope="module")
def collator(processor):
    return NanoVLMCollator(processor)


def image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def labelled_spans(labels):
    """Contiguous runs of labelled positions, as lists of token ids."""
    spans, current = [], []
    for token in labels.tolist() + [IGNORE]:
        if token != IGNORE:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans


def test_prompt_answer_rows_label_exactly_the_answer_and_end_of_turn(collator, processor):
    rows = [
        {"image": image(64, 128), "prompt": "Which digit is shown?", "answer": "The digit 7, top left."},
        {"image": image(200, 40, 1), "prompt": "Where?", "answer": "3"},
    ]
    batch = collator(rows)
    for index, row in enumerate(rows):
        spans = labelled_spans(batch["labels"][index])
        assert [processor.decode(span) for span in spans] == [row["answer"] + "<|im_end|>"]
        labelled = batch["labels"][index] != IGNORE
        assert torch.equal(batch["labels"][index][labelled], batch["input_ids"][index][labelled])
        # the prompt got its image placeholder, expanded to the planned number of tokens
        planned = processor.image_processor.num_image_tokens(*row["image"].shape[:2])
        assert int((batch["input_ids"][index] == processor.image_token_id).sum()) == planned


def test_chat_rows_label_every_assistant_turn_and_nothing_else(collator, processor):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}, {"type": "image"}]},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Where is it?"},
        {"role": "assistant", "content": [{"type": "text", "text": "top left"}]},
    ]
    batch = collator([{"images": [image(32, 32), image(48, 96)], "messages": messages}])
    spans = labelled_spans(batch["labels"][0])
    assert [processor.decode(span) for span in spans] == ["7<|im_end|>", "top left<|im_end|>"]
    assert batch["image_grid_hw"].shape == (2, 2)


def test_images_may_travel_inside_the_message_parts(collator):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image(64, 64)}, {"type": "text", "text": "Which?"}]},
        {"role": "assistant", "content": "7"},
    ]
    batch = collator([{"messages": messages}])
    assert batch["image_grid_hw"].tolist() == [[4, 4]]


def test_text_is_padded_on_the_right_and_images_are_not_padded(collator, processor):
    rows = [
        {"image": image(32, 240), "prompt": "Which digit is shown and where?", "answer": "The digit 7, top left."},
        {"image": image(160, 64, 2), "prompt": "Where?", "answer": "3"},
    ]
    batch = collator(rows)
    image_inputs = {"pixel_values", "image_grid_hw", "image_token_hw", "image_shuffle_factor"}
    assert set(batch) == {"input_ids", "attention_mask", "labels"} | image_inputs
    for mask in batch["attention_mask"]:
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # ones, then zeros
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == processor.tokenizer.pad_token_id).all()
    # pixels: exactly the planned patches of each image, one after the other
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_hw"].prod(dim=1).sum())


def test_a_prompt_that_places_its_image_is_left_alone(collator, processor):
    batch = collator([{"image": image(64, 64), "prompt": "Look: <image> which digit?", "answer": "7"}])
    text = processor.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>user\nLook: <image>")


def test_text_length_plus_planned_image_tokens_is_the_row_length(collator, processor):
    # The sampler predicts sequence lengths from this; it must match what the collator produces.
    rows = [
        {"image": image(64, 200), "prompt": "Which digit is shown?", "answer": "The digit 7, top left."},
        {"images": [image(40, 40), image(256, 100)], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": "3 bottom right"},
        ]},
    ]
    batch = collator(rows)
    plan = processor.image_processor.num_image_tokens
    for index, row in enumerate(rows):
        images = row.get("images") or [row["image"]]
        text_only = {key: value for key, value in row.items() if key not in ("image", "images")}
        predicted = collator.text_length(text_only) + sum(plan(*img.shape[:2]) for img in images)
        assert predicted == int(batch["attention_mask"][index].sum())


def test_the_batch_trains_the_model(collator):
    from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(tiny_config())
    batch = collator([
        {"image": image(64, 128), "prompt": "Which digit is shown?", "answer": "7"},
        {"image": image(100, 30), "prompt": "Where?", "answer": "top left"},
    ])
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_truncation_keeps_a_prefix_and_refuses_to_drop_the_whole_answer(processor):
    row = {"image": image(32, 32), "prompt": "Which digit is shown and where?", "answer": "The digit 7, top left."}
    full = NanoVLMCollator(processor)([row])
    length = int(full["attention_mask"].sum())
    cut = NanoVLMCollator(processor, max_length=length - 2)([row])
    assert torch.equal(cut["labels"][0], full["labels"][0][: length - 2])
    with pytest.raises(ValueError, match="row 0: max_length=.*truncates away the whole answer"):
        NanoVLMCollator(processor, max_length=length - 12)([row])


def with_image(**fields):
    return {"image": image(32, 32), **fields}


USER_ONLY = [{"role": "user", "content": "<image>?"}]
ASSISTANT_FIRST = [{"role": "assistant", "content": "7"}]
VIDEO_PART = [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "7"}]


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("just text", "row 1: expected a dict"),
        (with_image(question="?"), "row 1: needs 'messages' or 'prompt' \\+ 'answer'"),
        (with_image(prompt="Which?", answer=""), "row 1: 'prompt' must be a string"),
        (with_image(prompt="<image><image>?", answer="7"), "row 1: the text has 2 <image> placeholders but the row has 1"),
        (with_image(images=[image(32, 32)], prompt="?", answer="7"), "row 1: has both"),
        (with_image(messages=[]), "row 1: 'messages' must be a non-empty list"),
        (with_image(messages=USER_ONLY), "row 1: no non-empty assistant turn"),
        (with_image(messages=ASSISTANT_FIRST), "row 1: the conversation starts with an assistant"),
        (with_image(messages=VIDEO_PART), "row 1: message 0 has a part"),
        (with_image(messages=[{"content": "hi"}]), "row 1: message 0 must be a dict with a 'role'"),
        ({"image": b"not an image", "prompt": "?", "answer": "7"}, "row 1, image 0 of the row: cannot decode"),
    ],
)
def test_bad_rows_raise_a_value_error_naming_the_row(collator, bad_row, message):
    good_row = {"image": image(32, 32), "prompt": "Which digit?", "answer": "7"}
    with pytest.raises(ValueError, match=message):
        collator([good_row, bad_row])
