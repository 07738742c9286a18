"""NanoVLMCollator: labels cover exactly the assistant answers, both row formats, right padding, bad rows."""

import numpy as np
import pytest
import torch

from processing import NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor

from offline_tokenizer import build_tokenizer

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
        (
            with_image(prompt="<image><image>?", answer="7"),
            "row 1: the text has 2 <image> placeholders but the row has 1",
        ),
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


# --- labels come from the chat template's {% generation %} marks, in one pass -------------------------------------


def varied_rows():
    """Every row schema: prompt/answer, a system prompt and two answers, two images, images inside the message parts,
    the Cauldron's `texts` (images in front, or placed), answers that start with whitespace, a text-only row."""
    from PIL import Image

    return [
        {"image": image(64, 128), "prompt": "Which digit is shown?", "answer": "The digit 7, top left."},
        {"images": [image(32, 32), image(48, 96)], "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which?"}, {"type": "image"}]},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Where is it?"},
            {"role": "assistant", "content": [{"type": "text", "text": "top left"}]},
        ]},
        {"messages": [
            {"role": "user", "content": [{"type": "image", "image": image(64, 64)}, {"type": "text", "text": "Which"}]},
            {"role": "assistant", "content": "7"},
        ]},
        {"images": [Image.fromarray(image(64, 64, 3))], "texts": [
            {"user": "Which digit is shown?", "assistant": "The digit 7.", "source": "vqa"},
            {"user": "And where?", "assistant": "Top left."},
        ]},
        {"images": [image(40, 40), image(200, 80, 4)], "texts": [{"user": "Left <image>, right <image>: same?",
                                                                  "assistant": "No."}]},
        {"image": image(50, 70), "prompt": "Which?", "answer": "\n\nThe digit\n7\n"},
        {"prompt": "No image here. Which digit?", "answer": " 7, with a leading space"},
    ]


def labels_by_the_old_rule(collator, processor, row) -> list[int]:
    """The labels of one row as the collator computed them before the template marked the answers, kept as the
    reference: an answer runs from where the template's generation prompt for it ends through its `<|im_end|>`, a
    token is labelled when it starts inside an answer, and image tokens never are."""
    messages, images = collator.conversation(row)
    text = processor.apply_chat_template(messages, tokenize=False)
    answers = []
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(processor.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True))
            answers.append((start, text.index("<|im_end|>", start) + len("<|im_end|>")))
    sizes = [np.asarray(picture).shape[:2] for picture in images]
    image_tokens = iter(processor.image_processor.num_image_tokens(*size) for size in sizes)
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (offset, _) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        if token == processor.image_token_id:
            labels += [IGNORE] * next(image_tokens)
        else:
            labels.append(token if any(start <= offset < end for start, end in answers) else IGNORE)
    return labels


def test_labels_equal_the_old_rule_on_every_row_schema_alone_and_in_a_batch(collator, processor):
    rows = varied_rows()
    batch = collator(rows)
    for index, row in enumerate(rows):
        expected = labels_by_the_old_rule(collator, processor, row)
        assert collator([row])["labels"][0].tolist() == expected
        assert batch["labels"][index].tolist() == expected + [IGNORE] * (batch["labels"].shape[1] - len(expected))


def test_each_row_is_rendered_and_tokenized_once(collator, monkeypatch):
    """One template render per row and one tokenizer call per batch (before: 1 + 2 renders per answer, and every
    row tokenized twice)."""
    import transformers.processing_utils as processing_utils

    rendered, tokenized = [], []
    render = processing_utils.render_jinja_template
    tokenize = type(collator.tokenizer).__call__

    def counting_render(conversations, **kwargs):
        rendered.append(len(conversations))
        return render(conversations, **kwargs)

    def counting_tokenize(self, text=None, *args, **kwargs):
        tokenized.append(1 if isinstance(text, str) else len(text))
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(processing_utils, "render_jinja_template", counting_render)
    monkeypatch.setattr(type(collator.tokenizer), "__call__", counting_tokenize)
    rows = varied_rows()
    collator(rows)
    assert rendered == [len(rows)] and tokenized == [len(rows)]


def test_the_processor_marks_the_answers_past_the_expanded_image_tokens(processor):
    """What the collator and TRL's `assistant_only_loss` read: `assistant_masks` from `apply_chat_template`."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
        {"role": "assistant", "content": "3 bottom right"},
    ]
    out = processor.apply_chat_template(
        [messages], tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
        processor_kwargs={"images": [[image(64, 128), image(200, 40, 1)]]},
    )
    marked = labelled_spans(out["input_ids"][0].masked_fill(out["assistant_masks"][0] == 0, IGNORE))
    assert [processor.decode(span) for span in marked] == ["7<|im_end|>", "3 bottom right<|im_end|>"]
    assert "offset_mapping" not in out and "text_replacement_offsets" not in out


def test_a_chat_template_without_generation_marks_is_a_clear_error(processor):
    """A user's own template (or a real backbone's) without `{% generation %}` would label nothing: refuse it at
    construction, saying what to add, rather than train on no token."""
    from processing import CHAT_TEMPLATE, NanoVLMProcessor

    unmarked = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    custom = NanoVLMProcessor(processor.image_processor, processor.tokenizer, chat_template=unmarked)
    assert custom.apply_chat_template([{"role": "user", "content": "hi"}]) == processor.apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )
    with pytest.raises(ValueError, match=r"does not mark the assistant's answers with \{% generation %\}.*"
                                         r"processor.chat_template = processing.CHAT_TEMPLATE"):
        NanoVLMCollator(custom)
    custom.chat_template = {"default": CHAT_TEMPLATE}  # named templates: the default one is used
    collator = NanoVLMCollator(custom)
    custom.chat_template = unmarked  # changed after construction: refused at the next batch
    with pytest.raises(ValueError, match="does not mark the assistant's answers"):
        collator([{"image": image(32, 32), "prompt": "Which digit?", "answer": "7"}])
