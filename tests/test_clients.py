"""The clients VLM users already run, used as their users call them: TRL's SFTTrainer, PEFT LoRA, the generic
chat adapter of lmms-eval (in a fresh process with this repository blocked), transformers' pipeline, beam search,
and the transformers model conventions they rely on (headless AutoModel, image labels, inputs_embeds)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from fresh_process import BLOCK_REPOSITORY  # tests/ is on sys.path (pytest's rootdir insertion)
from PIL import Image

from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMModel, NanoVLMTrainer
from processing import ImageInputError

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


pytestmark = pytest.mark.usefixtures("one_thread")


def noise(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat_rows(count):
    """`images` + `messages` rows, the conversational VLM format TRL and our collator read."""
    answers = ["the digit 7, top left.", "a cat.", "bottom right.", "a cup of coffee."]
    return {
        "images": [[noise(48 + 16 * (i % 3), 64 + 24 * (i % 2), i)] for i in range(count)],
        "messages": [
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what do you see here?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answers[i % len(answers)]}]},
            ]
            for i in range(count)
        ],
    }


# --- TRL -----------------------------------------------------------------------------------------------


def sft_trainer(tmp_path, model, processor, rows=4, max_steps=2, data_collator=None, **config):
    """TRL's `SFTTrainer` as its users build it for a VLM: our processor as `processing_class`, chat rows."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    return trl.SFTTrainer(
        model=model,
        processing_class=processor,
        train_dataset=datasets.Dataset.from_dict(chat_rows(rows)),
        data_collator=data_collator,
        args=trl.SFTConfig(
            output_dir=str(tmp_path), max_length=None, max_steps=max_steps, per_device_train_batch_size=2,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, **config,
        ),
    )


def test_trl_sft_trainer_trains_with_our_processor(tmp_path, processor, make_tiny_model):
    """TRL's own VLM collator (apply_chat_template + processor(..., pad_to_multiple_of=..., padding_side=...))."""
    model = make_tiny_model()
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    trainer = sft_trainer(tmp_path, model, processor, rows=6, max_steps=3, learning_rate=1e-3, pad_to_multiple_of=8)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["input_ids"].shape[1] % 8 == 0  # pad_to_multiple_of reached the tokenizer
    assert (batch["labels"] == processor.image_token_id).any()  # TRL leaves image tokens in the labels...
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    changed = {name for name, value in model.named_parameters() if not torch.equal(value, before[name])}
    assert any(name.startswith("model.vision_tower.") for name in changed)
    assert any(name.startswith("model.language_model.") for name in changed)


def test_trl_sft_trainer_with_our_collator(tmp_path, processor, make_tiny_model):
    """With `data_collator=NanoVLMCollator(processor)`, labels hold the answers only, so TRL's loss normaliser
    (`num_items_in_batch`, the count of labels that are not -100) counts answer tokens only."""
    from processing import NanoVLMCollator

    trainer = sft_trainer(tmp_path, make_tiny_model(), processor, data_collator=NanoVLMCollator(processor))
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert not (batch["labels"] == processor.image_token_id).any() and (batch["labels"] != -100).any()
    trainer.train()
    assert all(np.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_trl_assistant_only_loss_labels_what_our_collator_labels(tmp_path, processor, make_tiny_model):
    """`SFTConfig(assistant_only_loss=True)` reads the `{% generation %}` marks of our chat template (through
    `return_assistant_tokens_mask`, moved past the expanded image tokens): TRL's own collator then labels exactly
    the answers and their `<|im_end|>`, as NanoVLMCollator does."""
    from processing import NanoVLMCollator

    trainer = sft_trainer(tmp_path, make_tiny_model(), processor, assistant_only_loss=True)
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    batch = trainer.data_collator([dict(row) for row in rows])
    ours = NanoVLMCollator(processor)(rows)
    assert torch.equal(batch["input_ids"], ours["input_ids"]) and torch.equal(batch["labels"], ours["labels"])
    trainer.train()
    assert all(np.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_labels_at_image_positions_do_not_change_the_loss(processor, tiny_model):
    """...and the model ignores them: the loss is the same with and without labels on image positions."""
    batch = processor(
        text=["<image>what is it? a cat.", "here: <image> a cup"], images=[noise(64, 96), noise(80, 48, 1)],
        padding_side="right", return_tensors="pt",
    )
    with_image_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    without = with_image_labels.masked_fill(batch["input_ids"] == processor.image_token_id, -100)
    assert (with_image_labels == processor.image_token_id).sum() > 0
    with torch.no_grad():
        loss_with = tiny_model(**batch, labels=with_image_labels).loss
        loss_without = tiny_model(**batch, labels=without).loss
    assert torch.equal(loss_with, loss_without)


# --- PEFT ----------------------------------------------------------------------------------------------


def test_peft_lora_on_the_language_model(tmp_path, processor, make_tiny_model):
    peft = pytest.importorskip("peft")
    datasets = pytest.importorskip("datasets")
    from transformers import TrainingArguments

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(make_tiny_model(), lora)
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
    layers = model.base_model.model.config.text_config.num_hidden_layers
    assert len(adapted) == 4 * layers  # q, k, v, o of every LM layer, nothing in the vision tower
    assert all(".language_model." in name for name in adapted)
    trainable = [name for name, value in model.named_parameters() if value.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)

    trainer = NanoVLMTrainer(
        model=model,
        processing_class=processor,
        train_dataset=datasets.Dataset.from_dict(chat_rows(4)),
        args=TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        ),
    )
    trainer.train()
    assert all(np.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)

    model.eval()
    batch = processor(text=["<image>what do you see here?"], images=[noise(64, 96, 3)], return_tensors="pt")
    with torch.no_grad():
        tuned = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "adapter")

    reloaded = peft.PeftModel.from_pretrained(make_tiny_model().eval(), tmp_path / "adapter").eval()
    with torch.no_grad():
        base = make_tiny_model().eval()(**batch).logits
        assert not torch.allclose(base, tuned)  # the adapter does something...
        assert torch.equal(reloaded(**batch).logits, tuned)  # ...and reloads exactly
        merged = reloaded.merge_and_unload()
        merged_logits = merged(**batch).logits
    assert isinstance(merged, NanoVLMForConditionalGeneration)
    torch.testing.assert_close(merged_logits, tuned, rtol=1e-5, atol=1e-5)  # merged weights: float rounding only


# --- lmms-eval's generic adapter and pipeline, remote code in a fresh process ----------------------------

FRESH_PROCESS = BLOCK_REPOSITORY + textwrap.dedent(
    """
    import builtins, json

    class Asked(BaseException):  # transformers catches Exception around its y/N prompt
        pass

    asked = []

    def never_ask(*args, **kwargs):
        asked.append(args)
        raise Asked(f"input() was called: {args}")

    builtins.input = never_ask

    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [Image.open(f"{folder}/image{i}.png") for i in range(2)]
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what do you see here?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "and here?"}, {"type": "image"}]}],
    ]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    inputs = processor(
        text=texts, images=images, videos=None, audios=None, padding=True, padding_side="left", return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                         {"type": "text", "text": "what do you see here?"}]}]
    piped = pipe(text=chat, generate_kwargs={"max_new_tokens": 4, "do_sample": False}, return_full_text=False)
    assert not asked, asked
    print(json.dumps({
        "model": type(model).__name__, "processor": type(processor).__name__,
        "modules": [type(model).__module__, type(processor).__module__],
        "ids": output.tolist(), "answers": answers, "pipeline": piped[0]["generated_text"],
    }))
    """
)


def test_lmms_eval_adapter_and_pipeline_in_a_fresh_process(tmp_path, processor, make_tiny_model):
    folder = tmp_path / "nanovlm"
    model = make_tiny_model().eval()
    model.save_pretrained(folder, processor=processor)
    images = [noise(64, 96, 0), noise(80, 48, 1)]
    for index, image in enumerate(images):
        image.save(folder / f"image{index}.png")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"] == "NanoVLMForConditionalGeneration" and report["processor"] == "NanoVLMProcessor"
    assert all(module.startswith("transformers_modules") for module in report["modules"])

    # the same sequence here, with the package: identical tokens
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what do you see here?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "and here?"}, {"type": "image"}]}],
    ]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    inputs = processor(text=texts, images=images, videos=None, audios=None, padding=True, padding_side="left",
                       return_tensors="pt")
    with torch.no_grad():
        local = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert report["ids"] == local.tolist()
    new_tokens = local[:, inputs["input_ids"].shape[1] :]
    assert report["answers"] == processor.batch_decode(new_tokens, skip_special_tokens=True)
    assert report["pipeline"] == report["answers"][0]


# --- generation ----------------------------------------------------------------------------------------


def generation_batch(processor):
    texts = ["<image>what do you see here?", "hello, where? <image> and <image>", "no image at all"]
    images = [[noise(64, 96, 0)], [noise(80, 48, 1), noise(32, 160, 2)], []]
    return texts, images


def test_beam_search_batched_matches_one_by_one(processor, make_tiny_model):
    model = make_tiny_model().eval()
    texts, images = generation_batch(processor)
    settings = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    batch = processor(text=texts, images=images, return_tensors="pt")
    with torch.no_grad():
        together = model.generate(**batch, **settings)
        for index, (text, sample_images) in enumerate(zip(texts, images)):
            alone = processor(text=[text], images=[sample_images] if sample_images else None, return_tensors="pt")
            single = model.generate(**alone, **settings)
            width = alone["input_ids"].shape[1]
            assert together[index, -5:].tolist() == single[0, width:].tolist(), index


def test_num_return_sequences_with_sampling_and_beams(processor, make_tiny_model):
    model = make_tiny_model().eval()
    texts, images = generation_batch(processor)
    batch = processor(text=texts, images=images, return_tensors="pt")
    with torch.no_grad():
        beams = model.generate(**batch, max_new_tokens=4, num_beams=4, num_return_sequences=2, do_sample=False)
        torch.manual_seed(0)
        sampled = model.generate(**batch, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    width = batch["input_ids"].shape[1]
    assert beams.shape == (6, width + 4) and sampled.shape == (9, width + 4)
    for index in range(3):  # each prompt's copies keep that prompt
        assert torch.equal(beams[2 * index : 2 * index + 2, :width], batch["input_ids"][index].expand(2, -1))
        assert torch.equal(sampled[3 * index : 3 * index + 3, :width], batch["input_ids"][index].expand(3, -1))
    with torch.no_grad():  # the best beam of 4 beams, 2 returned, is the one beam search returns alone
        best = model.generate(**batch, max_new_tokens=4, num_beams=4, do_sample=False)
    assert torch.equal(beams[::2], best)


# --- transformers model conventions ------------------------------------------------------------------


def test_auto_model_is_headless_and_image_text_to_text_generates(tmp_path, processor, make_tiny_model):
    from transformers import AutoModel, AutoModelForImageTextToText

    model = make_tiny_model().eval()
    assert model.base_model_prefix == "model" and isinstance(model.base_model, NanoVLMModel)
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    full = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(base) is NanoVLMModel and type(full) is NanoVLMForConditionalGeneration
    assert not hasattr(base, "lm_head") and base.get_output_embeddings() is None
    batch = processor(text=["<image>what do you see here?"], images=[noise(64, 96)], return_tensors="pt")
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
        logits = full(**batch).logits
    assert hidden.shape == (*batch["input_ids"].shape, model.config.text_config.hidden_size)
    torch.testing.assert_close(full.lm_head(hidden), logits, rtol=0, atol=0)
    # tied embeddings stay tied through save / load
    assert full.lm_head.weight.data_ptr() == full.get_input_embeddings().weight.data_ptr()


def test_inputs_embeds_with_pixel_values_finds_the_image_positions(processor, tiny_model):
    batch = processor(
        text=["<image>what is it?", "a <image> b"], images=[noise(64, 96), noise(48, 48, 1)], return_tensors="pt"
    )
    input_ids = batch.pop("input_ids")
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, **batch).logits
        embeds = tiny_model.get_input_embeddings()(input_ids)
        from_embeds = tiny_model(inputs_embeds=embeds, **batch).logits
    assert torch.equal(from_embeds, reference)
    with pytest.raises(ValueError, match="inputs_embeds hold .* image tokens but the images give"):
        tiny_model(inputs_embeds=embeds[:1], **batch)  # one sample's image positions, two images' features
    with torch.no_grad():  # generate from embeddings too, beams included (it returns the new tokens only)
        for settings in (dict(num_beams=1), dict(num_beams=2)):
            settings.update(max_new_tokens=3, do_sample=False)
            from_ids = tiny_model.generate(input_ids=input_ids, **batch, **settings)
            generated = tiny_model.generate(inputs_embeds=embeds, **batch, **settings)
            assert torch.equal(generated, from_ids[:, input_ids.shape[1] :]), settings


def test_old_checkpoint_layout_loads_and_is_what_save_writes(tmp_path, processor, make_tiny_model):
    """Checkpoints keep nanoVLM's first layout (language_model.model.*, language_model.lm_head.*): an untied
    model saved now writes exactly those keys and loads back to identical logits."""
    from safetensors.torch import load_file

    model = make_tiny_model(text={"tie_word_embeddings": False}).eval()
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "language_model.lm_head.weight" in keys and "language_model.model.embed_tokens.weight" in keys
    assert "vision_tower.embeddings.patch_embeddings.weight" in keys and any(k.startswith("connector.") for k in keys)
    loaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = processor(text=["<image>what?"], images=[noise(64, 96)], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


# --- processor conventions -----------------------------------------------------------------------------


def test_processor_routes_tokenizer_and_plan_arguments(processor):
    image = noise(256, 256)
    batch = processor(
        text=["<image> hello", "hi"], images=[image], videos=None, audio=None, audios=None, padding=True,
        padding_side="right", pad_to_multiple_of=16, return_attention_mask=True, max_image_tokens=16,
        return_tensors="pt",
    )
    assert batch["input_ids"].shape[1] % 16 == 0 and batch["attention_mask"][1, -1] == 0
    assert (batch["input_ids"] == processor.image_token_id).sum() == 16
    grouped = processor(text="<image> hello", images=[image], images_kwargs={"max_image_tokens": 4},
                        text_kwargs={"return_offsets_mapping": True})
    assert sum(token == processor.image_token_id for token in grouped["input_ids"][0]) == 4
    assert len(grouped["offset_mapping"][0]) == len(grouped["input_ids"][0])
    left = processor(text=["<image> hello", "hi"], images=[image], return_tensors="pt")
    assert left["attention_mask"][1, 0] == 0  # left padding by default, as generation wants
    no_mask = processor(text=["hi"], return_attention_mask=False)
    assert "attention_mask" not in no_mask
    with pytest.raises(ValueError, match="videos must be None or empty"):
        processor(text="<image>", images=[image], videos=[image])
    with pytest.raises(TypeError, match="unknown plan setting"):
        processor(text="<image>", images=[image], max_image_token=16)
    sizes = processor._get_num_multimodal_tokens(image_sizes=[(256, 256), (64, 96)], max_image_tokens=16)
    assert sizes.num_image_tokens == [processor.num_image_tokens(256, 256, max_image_tokens=16),
                                      processor.num_image_tokens(64, 96, max_image_tokens=16)]


def test_nan_or_infinite_pixels_are_clear_errors(processor):
    for bad in (np.nan, np.inf):
        array = np.random.default_rng(0).random((32, 32, 3))
        array[3, 4, 1] = bad
        for image in (array, torch.from_numpy(array)):
            with pytest.raises(ImageInputError, match="NaN|infinite"):
                processor(text=["<image>"], images=[image])


# --- the README section runs as written ---------------------------------------------------------------


def readme_snippets(title: str) -> list[str]:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1] for block in section.split("```")[1::2] if block.startswith("python")]


def test_readme_client_snippets_run_as_written(tmp_path, monkeypatch, processor, make_tiny_model):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    snippets = readme_snippets("## Use with TRL / PEFT / lmms-eval")
    assert len(snippets) == 3
    saved = tmp_path / "my-nanovlm"
    make_tiny_model().save_pretrained(saved, processor=processor)
    monkeypatch.chdir(tmp_path)  # the snippets write out-sft/, out-lora/
    namespace = {
        "model": make_tiny_model(),
        "processor": processor,
        "dataset": datasets.Dataset.from_dict(chat_rows(4)),
        "image": noise(96, 128, 5),
    }
    for snippet in snippets:
        exec(compile(snippet.replace('"me/my-nanovlm"', repr(str(saved))), "README.md", "exec"), namespace)
    assert (tmp_path / "out-lora" / "adapter" / "adapter_config.json").is_file()
    assert isinstance(namespace["merged"], NanoVLMForConditionalGeneration)
    assert namespace["ids"].shape[0] == 1 and namespace["ids"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
