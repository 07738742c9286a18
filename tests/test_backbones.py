"""Pretrained LMs as backbones, on tiny offline stand-ins: the LM's own chat template kept (with image parts and
`{% generation %}` marks), no undecodable tokens in generation, and GGUF inputs' errors. The same on the real
SmolLM2-135M-Instruct: tests/test_real_weights.py."""

import numpy as np
import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel, LlamaConfig, LlamaForCausalLM

from modeling_nanovlm import NanoVLMForConditionalGeneration
from modeling_nanovlm.backbones import load_language_model, split_gguf
from processing import CHAT_TEMPLATE, NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor

from offline_tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# SmolLM2-Instruct's template as it ships (a default system prompt when the chat has none; content as a string)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3-like: bos first, a system message taken out of the list, contents trimmed, turns end on eos_token
LLAMA_LIKE_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = 'Default system.' %}{%- endif %}"
    "{{- '[SYS]' + system + eos_token }}"
    "{%- for message in messages %}{{- '[' + message['role'] | upper + ']' + message['content'] | trim + eos_token }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '[ASSISTANT]' }}{%- endif %}\n"
)
# already marks its answers: kept as it is, only taught image parts
MARKED_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "A colour?"}],
    [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": "Blue."}],
]


def tokenizer_with(template):
    tokenizer = build_tokenizer(["hello, how can I help? answer in french. blue, a colour."] * 8)
    tokenizer.chat_template = template
    return tokenizer


def processor_for(tokenizer):
    return NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=16, max_image_size=128), tokenizer)


def image_chat(answer="Blue."):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, LLAMA_LIKE_TEMPLATE, MARKED_TEMPLATE])
def test_text_only_conversations_render_as_the_lms_own_template(template):
    tokenizer = tokenizer_with(template)
    processor = processor_for(tokenizer)
    assert processor.chat_template != CHAT_TEMPLATE
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            expected = tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
            found = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert found == expected
    if template == SMOLLM2_TEMPLATE:  # the LM's default system prompt is kept (CHAT_TEMPLATE has none)
        assert "named SmolLM" in processor.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, LLAMA_LIKE_TEMPLATE, MARKED_TEMPLATE])
def test_image_parts_and_answer_marks_on_the_lms_template(template):
    tokenizer = tokenizer_with(template)
    processor = processor_for(tokenizer)
    # an image part is an <image> placeholder where the text would be
    text_only = [{"role": "user", "content": "<image>Which colour?"}, {"role": "assistant", "content": "Blue."}]
    assert processor.apply_chat_template(image_chat()) == tokenizer.apply_chat_template(text_only, tokenize=False)
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    out = processor.apply_chat_template([image_chat()], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, images=[[image]])
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    marked = tokenizer.decode([token for token, keep in zip(ids, mask) if keep])
    end = "<|im_end|>"  # the offline tokenizer's eos: ChatML's end of turn, and the Llama-like template's
    assert marked == "Blue." + end
    # the collator's labels are exactly those tokens
    batch = NanoVLMCollator(processor)([{"image": image, "prompt": "Which colour?", "answer": "Blue."}])
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != -100]) == "Blue." + end


def test_several_answers_are_each_marked_with_their_end_of_turn():
    processor = processor_for(tokenizer_with(SMOLLM2_TEMPLATE))
    chat = CONVERSATIONS[2] + [{"role": "assistant", "content": "Red."}]
    out = processor.apply_chat_template([chat], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    spans, current = [], []
    for token, keep in zip(ids, mask):
        if keep:
            current.append(token)
        elif current:
            spans.append(processor.tokenizer.decode(current))
            current = []
    assert spans == ["Hello! How can I help?<|im_end|>", "Red.<|im_end|>"]


def test_a_tokenizer_without_template_keeps_chat_template():
    processor = processor_for(tokenizer_with(None))
    assert processor.chat_template == CHAT_TEMPLATE


def test_a_template_that_cannot_be_adapted_is_a_clear_error():
    # the template measures the answer, so the brackets around it would show: refused, not silently changed
    template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] | length }}{% endfor %}"
    with pytest.raises(ValueError, match="could not adapt this LM's chat template"):
        processor_for(tokenizer_with(template))
    # an explicit template is taken as given
    processor = NanoVLMProcessor(NanoVLMImageProcessor(), tokenizer_with(template), chat_template=CHAT_TEMPLATE)
    assert processor.chat_template == CHAT_TEMPLATE


def test_saved_processor_keeps_the_adapted_template(tmp_path):
    processor = processor_for(tokenizer_with(SMOLLM2_TEMPLATE))
    processor.save_pretrained(tmp_path)
    reloaded = NanoVLMProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.apply_chat_template(image_chat()) == processor.apply_chat_template(image_chat())


# --- no undecodable tokens ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny DINOv3 tower and a tiny Llama LM saved as pretrained folders; the LM's tokenizer lacks <image>."""
    folder = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_register_tokens=2)).save_pretrained(folder / "vision")
    tokenizer = build_tokenizer(["a tiny language model for tests"] * 10)
    plain = build_tokenizer(["a tiny language model for tests"] * 10)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) - 1, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(folder / "text")
    plain.save_pretrained(folder / "text")
    return folder


def test_generation_never_emits_padding_rows_nor_image_tokens(backbones, tmp_path):
    model = NanoVLMForConditionalGeneration.from_backbones(str(backbones / "vision"), str(backbones / "text")).eval()
    processor = NanoVLMProcessor.from_backbones(str(backbones / "text"), model_config=model.config,
                                                max_image_tokens=16)
    size, vocab = len(processor.tokenizer), model.config.text_config.vocab_size
    assert vocab > size and vocab % 64 == 0  # rows no tokenizer entry decodes
    suppressed = set(model.generation_config.suppress_tokens)
    assert suppressed == {model.config.image_token_id, *range(size, vocab)}
    # make the undecodable rows (and <image>) the LM's favourites: generation must still avoid them
    with torch.no_grad():
        head = model.lm_head.weight
        head[size:] = head[: vocab - size] * 0 + 10 * head.abs().max()
        head[model.config.image_token_id] = 10 * head.abs().max()
        model.lm_head.bias = None
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    batch = processor(text=["<image>describe"], images=[image], return_tensors="pt")
    forced = model(**batch).logits[0, -1].argmax().item()
    assert forced >= size or forced == model.config.image_token_id  # without suppression they would win
    for settings in ({"do_sample": False}, {"do_sample": True, "top_k": 0}, {"num_beams": 2}):
        output = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, **settings)
        new = output[0, batch["input_ids"].shape[1]:]
        assert (new < size).all() and (new != model.config.image_token_id).all(), (settings, new)
    # the setting travels with the saved model
    model.save_pretrained(tmp_path)
    reloaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path)
    assert set(reloaded.generation_config.suppress_tokens) == suppressed


def test_suppress_undecodable_tokens_refuses_a_bigger_tokenizer(make_tiny_model):
    model = make_tiny_model()
    with pytest.raises(ValueError, match="does not fit"):
        model.suppress_undecodable_tokens(model.config.text_config.vocab_size + 1)


# --- GGUF inputs ---------------------------------------------------------------------------------------------


def test_gguf_paths_are_resolved_or_refused(tmp_path):
    (tmp_path / "lm.gguf").write_bytes(b"")
    assert split_gguf(tmp_path / "lm.gguf") == (str(tmp_path), "lm.gguf")
    assert split_gguf(tmp_path, gguf_file="lm.gguf") == (str(tmp_path), "lm.gguf")
    assert split_gguf("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        split_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file 'other.gguf'"):
        split_gguf(tmp_path, gguf_file="other.gguf")
    with pytest.raises(ValueError, match="not a .gguf file"):
        split_gguf(tmp_path, gguf_file="lm.bin")
    with pytest.raises(ValueError, match="either a .gguf path"):
        split_gguf(tmp_path / "lm.gguf", gguf_file="lm.gguf")


def test_a_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "lm.gguf").write_bytes(b"")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(ImportError, match=r"nanovlm\[gguf\]"):
        load_language_model(tmp_path / "lm.gguf")
    with pytest.raises(ImportError, match=r"nanovlm\[gguf\]"):
        NanoVLMProcessor.from_backbones(str(tmp_path / "lm.gguf"))
