"""NanoVLMProcessor: per-call budget override, save / load (local and remote code in a fresh process),
mismatches and truncation, factor errors, forward + backward through both connectors, chat templates."""

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

from modeling_nanovlm import pixel_shuffle, pixel_unshuffle
from processing import ImageTextMismatchError, NanoVLMImageProcessor, NanoVLMProcessor


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_tokens(batch, processor):
    return (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()


# --- per-call override -----------------------------------------------------------------------------


def test_per_call_override_changes_this_call_only(processor):
    image = noise(256, 256)
    assert image_tokens(processor(text="<image> hi", images=[image], return_tensors="pt"), processor) == [64]
    small = processor(text="<image> hi", images=[image], return_tensors="pt", max_image_tokens=16)
    assert image_tokens(small, processor) == [16] and small["image_shuffle_factor"].tolist() == [4]
    assert processor.image_processor.max_image_tokens == 64  # config unchanged
    assert image_tokens(processor(text="<image> hi", images=[image], return_tensors="pt"), processor) == [64]
    low_res = processor(text="<image>", images=[image], return_tensors="pt", max_image_size=128)
    assert low_res["image_grid_hw"].tolist() == [[8, 8]] and processor.image_processor.max_image_size == 512
    assert processor.num_image_tokens(256, 256, max_image_tokens=16) == 16
    with pytest.raises(TypeError, match="unknown plan setting"):  # a misspelt override is not dropped silently
        processor(text="<image>", images=[image], max_image_token=16)


def test_text_only_and_images_only_calls(processor):
    batch = processor(text=["no image here", "nor here"], return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    images_only = processor(images=[noise(64, 96)], return_tensors="pt")
    assert images_only["image_token_hw"].tolist() == [[4, 6]]
    with pytest.raises(ValueError, match="give text, images, or both"):
        processor()


# --- save / load -----------------------------------------------------------------------------------

ROUND_TRIP_TEXTS = ["<image> what is this?", "two: <image> and <image> here"]


def round_trip_images():
    return [noise(90, 200, 1), noise(300, 120, 2), noise(33, 47, 3)]


def test_config_round_trip(tokenizer, tmp_path):
    processor = NanoVLMProcessor(
        image_processor=NanoVLMImageProcessor(max_image_tokens=37, max_image_size=384, shuffle_factors=[1, 2]),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    settings = saved.get("image_processor", saved)
    assert settings["max_image_tokens"] == 37 and settings["max_image_size"] == 384
    assert settings["shuffle_factors"] == [1, 2]
    assert {"processing_nanovlm.py", "image_processing_nanovlm.py"} <= set(os.listdir(tmp_path))

    loaded = NanoVLMProcessor.from_pretrained(tmp_path)  # no trust_remote_code needed for our own class
    assert type(loaded.image_processor) is NanoVLMImageProcessor
    for field in NanoVLMImageProcessor.plan_fields:
        assert getattr(loaded.image_processor, field) == getattr(processor.image_processor, field), field
    assert loaded.image_token_id == processor.image_token_id
    before = processor(text=ROUND_TRIP_TEXTS, images=round_trip_images(), return_tensors="pt")
    after = loaded(text=ROUND_TRIP_TEXTS, images=round_trip_images(), return_tensors="pt")
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


REMOTE_SCRIPT = BLOCK_REPOSITORY + textwrap.dedent(
    """
    import json
    import numpy as np
    from transformers import AutoProcessor

    folder = sys.argv[1]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    assert type(processor.image_processor).__module__.startswith("transformers_modules")
    images = [np.load(f"{folder}/image{i}.npy") for i in range(3)]
    batch = processor(text=json.load(open(f"{folder}/texts.json")), images=images, return_tensors="np")
    np.savez(f"{folder}/remote.npz", **batch)
    small = processor(text="<image>", images=images[:1], max_image_tokens=4, return_tensors="np")
    try:
        processor(text=["<image>", "<image>"], images=[images[0], b"not an image"])
        error = None
    except ValueError as caught:
        error = str(caught)
    print(json.dumps({
        "max_image_tokens": processor.image_processor.max_image_tokens,
        "override_tokens": int((small["input_ids"] == processor.image_token_id).sum()),
        "error": error,
    }))
    """
)


def test_auto_processor_loads_remote_code_in_a_fresh_process(tokenizer, tmp_path):
    folder = tmp_path / "saved"
    processor = NanoVLMProcessor(
        image_processor=NanoVLMImageProcessor(max_image_tokens=37, max_image_size=384), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)
    assert {"processing_nanovlm.py", "image_processing_nanovlm.py"} <= set(os.listdir(folder))
    images = round_trip_images()
    for index, image in enumerate(images):
        np.save(folder / f"image{index}.npy", image)
    (folder / "texts.json").write_text(json.dumps(ROUND_TRIP_TEXTS))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder)], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["max_image_tokens"] == 37
    assert report["override_tokens"] == processor.num_image_tokens(90, 200, max_image_tokens=4) == 3
    assert report["error"] is not None and "sample 1, image 1" in report["error"]
    local = processor(text=ROUND_TRIP_TEXTS, images=images, return_tensors="np")
    remote = np.load(folder / "remote.npz")
    assert set(remote.files) == set(local)
    for key in local:
        np.testing.assert_array_equal(remote[key], local[key], err_msg=key)


# --- mismatches and truncation ---------------------------------------------------------------------


def test_image_placeholder_mismatches_are_errors(processor):
    image = noise(32, 32)
    cases = [
        (dict(text="<image> one", images=[image, image]), r"1 <image> placeholders .* but 2 images"),
        (
            dict(text=["<image>", "<image> <image>"], images=[image, image]),
            r"3 <image> placeholders .*\[1, 2\].* 2 images",
        ),
        (dict(text="no placeholder", images=[image]), r"0 <image> placeholders .* but 1 images"),
        (dict(text="<image> but none given"), r"1 <image> placeholders .* but 0 images"),
        (
            dict(text=["<image>", "<image>"], images=[[image, image], []]),
            r"sample 0 has 1 <image> placeholders but 2 images",
        ),
        (dict(text=["<image>", "<image>"], images=[[image]]), r"image lists for 1 samples but 2 texts"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ImageTextMismatchError, match=message):
            processor(**kwargs)
    assert issubclass(ImageTextMismatchError, ValueError)
    grouped = processor(text=["<image>", "a <image> b <image>"], images=[[image], [image, image]], return_tensors="pt")
    assert image_tokens(grouped, processor) == [4, 8]  # 32x32 at s=1: 2x2 tokens each


def test_truncation_through_image_tokens_is_an_error(processor):
    image = noise(256, 256)  # 64 image tokens
    with pytest.raises(ValueError, match=r"sample 1: the images need 64 image tokens but 10 remain.*truncation"):
        processor(text=["short", "<image> and some text"], images=[image], truncation=True, max_length=10)
    ok = processor(
        text="<image> and some more text", images=[image], truncation=True, max_length=66, return_tensors="pt"
    )
    assert image_tokens(ok, processor) == [64] and ok["input_ids"].shape[1] == 66  # text cut, image kept whole


# --- factor errors -----------------------------------------------------------------------------------


def test_pixel_shuffle_checks_the_grid():
    x = torch.randn(2, 6 * 10, 8)
    shuffled = pixel_shuffle(x, 6, 10, 2)
    assert shuffled.shape == (2, 15, 32)
    assert torch.equal(pixel_unshuffle(shuffled, 6, 10, 2), x)
    assert torch.equal(shuffled[0, 0], torch.cat([x[0, 0], x[0, 1], x[0, 10], x[0, 11]]))  # one 2x2 cell, row-major
    with pytest.raises(ValueError, match="factor 4 does not divide the 6x10 grid"):
        pixel_shuffle(x, 6, 10, 4)
    with pytest.raises(ValueError, match="do not form a 7x10 grid"):
        pixel_shuffle(x, 7, 10, 1)
    with pytest.raises(ValueError, match="is not a 6x10 grid shuffled by 3"):
        pixel_unshuffle(shuffled, 6, 10, 3)


def test_model_refuses_a_factor_it_has_no_projection_for(processor, make_tiny_model):
    model = make_tiny_model(shuffle_factors=(1, 2)).eval()
    batch = processor(text="<image>", images=[noise(256, 256)], max_image_tokens=16, return_tensors="pt")
    assert batch["image_shuffle_factor"].tolist() == [4]
    with torch.no_grad(), pytest.raises(ValueError, match=r"shuffle factor 4.*only has projections for \[1, 2\]"):
        model(**batch)


def test_model_refuses_a_plan_that_does_not_fit_the_grid(processor, tiny_model):
    batch = processor(text="<image>", images=[noise(96, 96)], max_image_tokens=9, return_tensors="pt")
    assert batch["image_grid_hw"].tolist() == [[6, 6]] and batch["image_token_hw"].tolist() == [[3, 3]]
    bad = {**batch, "image_shuffle_factor": torch.tensor([4])}  # 3x3 tokens x 4 = 12x12 > 6x6 patches
    with torch.no_grad(), pytest.raises(ValueError, match=r"does not fit the 6x6 patch grid"):
        tiny_model(**bad)
    with torch.no_grad(), pytest.raises(ValueError, match="hold 35 patches but image_grid_hw describes 36"):
        tiny_model(**{**batch, "pixel_values": batch["pixel_values"][:-1]})


# --- one source for the settings the model fixes -------------------------------------------------------


def test_image_processor_from_model_config_takes_the_models_settings(tokenizer, make_tiny_model):
    from modeling_nanovlm import tiny_config

    config = tiny_config(shuffle_factors=(4, 2), image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2])
    ip = NanoVLMImageProcessor.from_model_config(config, max_image_tokens=36, max_image_size=384, pixel_dtype="uint8")
    assert (ip.patch_size, ip.connector, ip.shuffle_factors) == (16, "shuffle", [2, 4])
    assert (ip.image_mean, ip.image_std) == ([0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    assert (ip.max_image_tokens, ip.max_image_size, ip.pixel_dtype) == (36, 384, "uint8")
    ip.check_model_config(config)
    # Repeating a model setting is fine when it agrees, and an error naming it when it does not.
    assert NanoVLMImageProcessor.from_model_config(config, shuffle_factors=[2, 4]).shuffle_factors == [2, 4]
    with pytest.raises(ValueError, match=r"shuffle_factors=\[1, 2\] \(model: \[2, 4\]\)"):
        NanoVLMImageProcessor.from_model_config(config, shuffle_factors=[1, 2])

    model = make_tiny_model(connector="perceiver", perceiver_latents=8, perceiver_heads=4, perceiver_head_dim=32).eval()
    processor = NanoVLMProcessor.from_backbones("unused", tokenizer=tokenizer, model_config=model.config,
                                                max_image_tokens=64)
    assert (processor.image_processor.connector, processor.image_processor.perceiver_latents) == ("perceiver", 8)
    batch = processor(text="<image>what?", images=[noise(70, 130)], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_from_backbones_pair_needs_each_setting_once(tmp_path):
    """Pretrained backbones with an 8-px patch: the processor learns the patch size (and the factors) from the model,
    with nothing repeated, and the pair runs."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, LlamaConfig, LlamaForCausalLM

    from modeling_nanovlm import NanoVLMForConditionalGeneration

    from offline_tokenizer import build_tokenizer

    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_register_tokens=0, patch_size=8)).save_pretrained(tmp_path / "vision")
    tokenizer = build_tokenizer(["a tiny language model for tests"] * 10)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")

    vision, text = str(tmp_path / "vision"), str(tmp_path / "text")
    model = NanoVLMForConditionalGeneration.from_backbones(vision, text, shuffle_factors=[2, 4]).eval()
    processor = NanoVLMProcessor.from_backbones(text, model_config=model.config, max_image_tokens=16)
    assert (processor.image_processor.patch_size, processor.image_processor.shuffle_factors) == (8, [2, 4])
    batch = processor(text=["<image>describe"], images=[noise(64, 96)], return_tensors="pt")
    assert batch["pixel_values"].shape[1] == 3 * 8 * 8
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_check_model_config_names_every_setting_the_model_would_refuse(processor, tokenizer):
    from modeling_nanovlm import tiny_config

    config = tiny_config(image_token_id=processor.image_token_id, shuffle_factors=(1, 2, 4))
    processor.check_model_config(config)
    NanoVLMImageProcessor(shuffle_factors=[2, 4]).check_model_config(config)  # a subset with the same largest factor
    refused = {
        r"patch_size 8 \(the tower's is 16\)": NanoVLMImageProcessor(patch_size=8),
        r"shuffle_factors \[1, 2\] \(the model has projections for \[1, 2, 4\]\)": NanoVLMImageProcessor(
            shuffle_factors=[1, 2]
        ),
        r"shuffle_factors \[2, 8\]": NanoVLMImageProcessor(shuffle_factors=[2, 8]),
        "connector 'perceiver' \\(the model's is 'shuffle'\\)": NanoVLMImageProcessor(connector="perceiver"),
        "image_mean/image_std": NanoVLMImageProcessor(pixel_dtype="uint8", image_std=[0.5, 0.5, 0.5]),
    }
    for message, image_processor in refused.items():
        with pytest.raises(ValueError, match=message + ".*from_model_config"):
            image_processor.check_model_config(config)
    perceiver = tiny_config(connector="perceiver", perceiver_latents=8)
    with pytest.raises(ValueError, match=r"perceiver_latents 16 \(the model's is 8\)"):
        NanoVLMImageProcessor(connector="perceiver", perceiver_latents=16).check_model_config(perceiver)
    with pytest.raises(ValueError, match=f"id {processor.image_token_id} but the model's image_token_id is 1"):
        processor.check_model_config(tiny_config(image_token_id=1))
    with pytest.raises(ValueError, match="image_token_id"):
        NanoVLMProcessor.from_backbones("unused", tokenizer=tokenizer, model_config=tiny_config(image_token_id=1))


def test_trainer_refuses_a_processor_that_does_not_fit_the_model(tmp_path, processor, make_tiny_model):
    """Caught when the trainer is built, before any data is read, not at the first forward."""
    from transformers import TrainingArguments

    from modeling_nanovlm import NanoVLMTrainer

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    model = make_tiny_model(shuffle_factors=(2, 4))
    NanoVLMTrainer(model=model, args=args, processing_class=NanoVLMProcessor(
        NanoVLMImageProcessor.from_model_config(model.config, max_image_tokens=64), processor.tokenizer
    ))
    with pytest.raises(ValueError, match=r"shuffle_factors \[1, 2\]"):
        NanoVLMTrainer(model=model, args=args, processing_class=NanoVLMProcessor(
            NanoVLMImageProcessor(max_image_tokens=64, shuffle_factors=[1, 2]), processor.tokenizer
        ))


# --- forward + backward through each connector -------------------------------------------------------


def train_step(model, batch, image_token_id):
    model.train()
    labels = batch["input_ids"].clone()
    labels[(labels == image_token_id) | (batch["attention_mask"] == 0)] = -100
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()
    return out


def assert_has_grad(parameter, name):
    assert parameter.grad is not None, f"no gradient reaches {name}"
    assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_forward_backward_shuffle_connector_mixed_sizes(tokenizer, make_tiny_model):
    processor = NanoVLMProcessor(image_processor=NanoVLMImageProcessor(max_image_tokens=16), tokenizer=tokenizer)
    model = make_tiny_model()
    sizes = [(40, 60), (100, 130), (400, 300)]  # s=1, s=2, and s=4 pooled
    plans = [processor.image_processor.plan(h, w) for h, w in sizes]
    assert [p.shuffle_factor for p in plans] == [1, 2, 4] and plans[2].pooled
    batch = processor(
        text=["<image> what is it?", "two: <image> and <image> in one."],  # text after each image carries its loss
        images=[noise(h, w, i) for i, (h, w) in enumerate(sizes)],
        padding_side="right",
        return_tensors="pt",
    )
    train_step(model, batch, processor.image_token_id)
    assert_has_grad(model.vision_tower.embeddings.patch_embeddings.weight, "the vision tower's patch embedding")
    first_q_proj = model.vision_tower.get_parameter("model.layer.0.attention.q_proj.weight")
    assert_has_grad(first_q_proj, "the tower's first layer")
    for s in (1, 2, 4):
        assert_has_grad(model.connector.projections[str(s)].fc1.weight, f"the s={s} projection")
    assert_has_grad(model.get_input_embeddings().weight, "the LM embeddings")


@pytest.mark.parametrize("pooled_queries", [False, True])
def test_forward_backward_perceiver_connector_mixed_sizes(tokenizer, make_tiny_model, pooled_queries):
    model = make_tiny_model(connector="perceiver", perceiver_latents=8, perceiver_heads=4, perceiver_head_dim=32,
                            perceiver_pooled_queries=pooled_queries)
    image_processor = NanoVLMImageProcessor.from_model_config(model.config, max_image_tokens=64)
    processor = NanoVLMProcessor(image_processor=image_processor, tokenizer=tokenizer)
    images = [noise(40, 60, 0), noise(100, 130, 1), noise(300, 200, 2)]
    batch = processor(
        text=["<image> what is it?", "two: <image> and <image> in one."], images=images, padding_side="right",
        return_tensors="pt",
    )
    assert image_tokens(batch, processor) == [8, 16]
    assert len({tuple(g) for g in batch["image_grid_hw"].tolist()}) == 3  # three distinct shapes in one batch
    train_step(model, batch, processor.image_token_id)
    assert_has_grad(model.vision_tower.embeddings.patch_embeddings.weight, "the vision tower's patch embedding")
    assert_has_grad(model.connector.projection.fc1.weight, "the Perceiver's input projection")
    assert_has_grad(model.connector.perceiver.latents, "the Perceiver latents")


# --- chat template -------------------------------------------------------------------------------------


def test_apply_chat_template_with_images(processor, tiny_model):
    first, second = Image.fromarray(noise(100, 150, 0)), Image.fromarray(noise(64, 64, 1))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cup of coffee."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.count("<image>") == 2 and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>user\n<image>What is this?<|im_end|>\n")
    batch = processor(text=prompt, images=[first, second], return_tensors="pt")
    assert image_tokens(batch, processor) == [processor.num_image_tokens(100, 150) + processor.num_image_tokens(64, 64)]

    # tokenize=True loads the images from the messages themselves
    with_images = [{"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "What?"}]}]
    encoded = processor.apply_chat_template(
        with_images, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert image_tokens(encoded, processor) == [processor.num_image_tokens(100, 150)]
    with torch.no_grad():
        generated = tiny_model.generate(**encoded, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, encoded["input_ids"].shape[1] + 3)


def test_images_as_paths_and_encoded_bytes_give_the_same_batch(processor, tmp_path):
    import io

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    path = tmp_path / "photo.png"
    image.save(path)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    batches = [
        processor(text="<image>what?", images=[source], return_tensors="pt")
        for source in (image, str(path), encoded.getvalue())
    ]
    for batch in batches[1:]:
        assert torch.equal(batch["input_ids"], batches[0]["input_ids"])
        assert torch.equal(batch["pixel_values"], batches[0]["pixel_values"])


def test_save_pretrained_refuses_a_processor_that_does_not_fit_the_model(tmp_path, processor, make_tiny_model):
    """Nothing is written: a mismatched pair on the Hub would fail for every user at their first forward."""
    model = make_tiny_model(shuffle_factors=(2, 4))
    mismatched = NanoVLMProcessor(
        NanoVLMImageProcessor(max_image_tokens=64, shuffle_factors=[1, 2]), processor.tokenizer
    )
    with pytest.raises(ValueError, match=r"shuffle_factors \[1, 2\]"):
        model.save_pretrained(tmp_path / "bad", processor=mismatched)
    assert not (tmp_path / "bad").exists()
    fitting = NanoVLMProcessor(NanoVLMImageProcessor.from_model_config(model.config), processor.tokenizer)
    model.save_pretrained(tmp_path / "good", processor=fitting)
    assert (tmp_path / "good" / "processor_config.json").exists()


@pytest.mark.parametrize("setting", [{"connector": "perceiver"}, {"shuffle_factors": [2, 4]}, {"patch_size": 14},
                                     {"perceiver_latents": 8, "connector": "perceiver"}])
def test_settings_the_weights_fix_cannot_change_per_call(processor, setting):
    """The connector, its factors and latents and the patch size come from the model config; a call may change the
    budget(s), max_image_size, snapping and pixel settings. The processor's own values are no change."""
    image = np.zeros((64, 96, 3), np.uint8)
    with pytest.raises(ValueError, match=r"per call: the model's weights fix .*from_model_config\(model\.config"):
        processor(text=["<image>hi"], images=[image], **setting)
    with pytest.raises(ValueError, match="from_model_config"):
        processor.image_processor.num_image_tokens(64, 96, **setting)
    same = {name: getattr(processor.image_processor, name) for name in setting}
    assert processor.image_processor.num_image_tokens(64, 96, **same) == processor.image_processor.num_image_tokens(
        64, 96)
