"""The real pretrained SmolLM2-135M-Instruct (tests/real_weights.py fetches and converts it once) through every path:
a GGUF backbone, text-only logits and greedy answers equal to the plain LM's, the LM's own chat template, training
labels, a fresh-process Auto reload, PEFT LoRA and TRL's SFTTrainer. A tiny random DINOv3 tower keeps them cheap."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DINOv3ViTConfig, DINOv3ViTModel

from modeling_nanovlm import NanoVLMForConditionalGeneration
from processing import NanoVLMCollator, NanoVLMProcessor

from test_clients import LORA_TARGETS, chat_rows, sft_trainer  # tests/ is on sys.path (pytest's rootdir insertion)
from test_export import run_fresh

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 3?"]


def chat(question):
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_register_tokens=2)).save_pretrained(folder)
    return folder


def build(vision_folder, text_model):
    """(model, processor) from the tiny tower and the real LM, as a user builds them."""
    model = NanoVLMForConditionalGeneration.from_backbones(str(vision_folder), str(text_model)).eval()
    processor = NanoVLMProcessor.from_backbones(str(text_model), model_config=model.config, max_image_tokens=16,
                                                max_image_size=128)
    return model, processor


@pytest.fixture(scope="module")
def real(vision_folder, smollm2_folder):
    """A nanoVLM on the real LM (shared: tests that train build their own)."""
    return build(vision_folder, smollm2_folder)


@pytest.fixture(scope="module")
def plain(smollm2_folder):
    return AutoModelForCausalLM.from_pretrained(smollm2_folder).eval(), AutoTokenizer.from_pretrained(smollm2_folder)


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (64, 96, 3), dtype=np.uint8)


def test_a_gguf_file_is_a_backbone(vision_folder, smollm2_gguf, smollm2_folder, tmp_path):
    """The GGUF file itself: de-quantised into a plain model that saves, tokenizer and template from the file."""
    processor = NanoVLMProcessor.from_backbones(str(smollm2_gguf), max_image_tokens=16)
    model = NanoVLMForConditionalGeneration.from_backbones(
        str(vision_folder), str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, tokenizer=processor.tokenizer
    )
    assert getattr(model.config.text_config, "quantization_config", None) is None
    assert model.config.base_models[1] == str(smollm2_gguf)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    for name, tensor in reference.model.state_dict().items():
        if name != "embed_tokens.weight":
            assert torch.equal(model.language_model.state_dict()[name], tensor), name
    vocab = reference.config.vocab_size
    assert torch.equal(model.get_input_embeddings().weight[:vocab], reference.get_input_embeddings().weight)
    assert "named SmolLM" in processor.apply_chat_template(chat("Hi"))
    model.save_pretrained(tmp_path / "saved", processor=processor)  # a GGUF-loaded LM alone would refuse
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_text_only_logits_and_greedy_answers_equal_the_plain_lm(real, plain):
    model, processor = real
    lm, tokenizer = plain
    vocab = lm.config.vocab_size
    answers = []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template(chat(question), tokenize=False, add_generation_prompt=True)
        # the processor renders what the LM's tokenizer renders, default system prompt included
        assert processor.apply_chat_template(chat(question), add_generation_prompt=True) == prompt
        ours = processor(text=[prompt], return_tensors="pt")
        theirs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        with torch.no_grad():
            torch.testing.assert_close(model(**ours).logits[..., :vocab], lm(**theirs).logits, rtol=1e-5, atol=1e-5)
            answer = model.generate(**ours, max_new_tokens=24, do_sample=False)
            expected = lm.generate(**theirs, max_new_tokens=24, do_sample=False)
        assert answer.tolist() == expected.tolist()
        answers.append(processor.decode(answer[0, ours["input_ids"].shape[1]:], skip_special_tokens=True))
    assert "Paris" in answers[0]  # real weights, really loaded


def test_training_labels_with_the_real_tokenizer(real):
    model, processor = real
    rows = [{"image": image(0), "prompt": "What is shown?", "answer": "A noisy picture."},
            {"images": [image(1)], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Grey."}]}]}]
    batch = NanoVLMCollator(processor)(rows)
    tokenizer = processor.tokenizer
    labelled = [tokenizer.decode(labels[labels != -100]) for labels in batch["labels"]]
    assert labelled == ["A noisy picture.<|im_end|>", "Grey.<|im_end|>"]
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the LM's template
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_saved_model_reloads_in_a_fresh_process_with_identical_logits_and_answers(real, tmp_path):
    model, processor = real
    folder = tmp_path / "nanovlm"
    model.save_pretrained(folder, processor=processor)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(text=[prompt], images=[image()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        answer = model.generate(**batch, max_new_tokens=12, do_sample=False)
    torch.save({"batch": dict(batch), "logits": logits, "answer": answer, "image": image(), "prompt": prompt},
               tmp_path / "reference.pt")
    out = run_fresh(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        torch.set_num_threads(1)
        folder = {str(folder)!r}
        reference = torch.load({str(tmp_path / "reference.pt")!r}, weights_only=False)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert processor.apply_chat_template(
            [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is this?"}}]}}],
            add_generation_prompt=True) == reference["prompt"]
        batch = processor(text=[reference["prompt"]], images=[reference["image"]], return_tensors="pt")
        for key, value in reference["batch"].items():
            assert torch.equal(batch[key], value), key
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, reference["logits"])
            assert torch.equal(model.generate(**batch, max_new_tokens=12, do_sample=False), reference["answer"])
        assert model.config.image_token_id in model.generation_config.suppress_tokens
        print("identical")
        """,
        cwd=tmp_path,
    )
    assert "identical" in out


def test_peft_lora_on_the_real_lm(vision_folder, smollm2_folder, tmp_path):
    peft = pytest.importorskip("peft")
    model, processor = build(vision_folder, smollm2_folder)
    original = {name: value.clone() for name, value in model.state_dict().items()}  # connector, new rows: random
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(model, lora)
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
    assert len(adapted) == 4 * 30 and all(".language_model." in name for name in adapted)  # SmolLM2-135M: 30 layers
    batch = NanoVLMCollator(processor)([{"image": image(), "prompt": "What is shown?", "answer": "Noise."}])
    model.train()
    loss = model(**batch).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    torch.optim.SGD(trainable, lr=1e-3).step()
    model.eval()
    with torch.no_grad():
        tuned = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    base, _ = build(vision_folder, smollm2_folder)
    base.load_state_dict(original)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, tuned)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, tuned, rtol=1e-4, atol=1e-3)  # 30 layers of rounding


def test_trl_sft_trainer_on_the_real_lm(vision_folder, smollm2_folder, tmp_path):
    """TRL's own collator with the real tokenizer and its template (assistant_only_loss reads our marks); the LM is
    frozen, so the steps train the tower and the connector."""
    model, processor = build(vision_folder, smollm2_folder)
    model.train()
    for parameter in [*model.language_model.parameters(), *model.lm_head.parameters()]:
        parameter.requires_grad_(False)
    before = {name: value.detach().clone() for name, value in model.model.connector.named_parameters()}
    trainer = sft_trainer(tmp_path, model, processor, rows=4, max_steps=2, learning_rate=1e-3,
                          assistant_only_loss=True)
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(2)])
    answers = chat_rows(2)["messages"]
    for labels, messages in zip(batch["labels"], answers):
        expected = messages[1]["content"][0]["text"] + "<|im_end|>"
        assert processor.tokenizer.decode(labels[labels != -100]) == expected
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(not torch.equal(value, before[name]) for name, value in model.model.connector.named_parameters())
