"""The main job: examples/finetune.py (the command line), its two recipes (examples/digits_recipe.py,
examples/finetune_dataset.py), the built-in task (examples/digits.py), the shared pieces (examples/training_tools.py).

End-to-end runs go through a subprocess, as `make demo` does, with tiny settings: a few steps, small canvases,
a handful of held-out digits. The real-backbone path runs on tiny random DINOv3 + Llama checkpoints and a tiny
dataset saved to temporary folders, offline.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import finetune  # noqa: E402
import finetune_dataset  # noqa: E402

import digits  # noqa: E402
import digits_recipe  # noqa: E402
import training_tools  # noqa: E402


def run_finetune(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(EXAMPLES / "finetune.py"), "--threads", "1", *map(str, args)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def check_artifacts(output_dir: Path, metric_keys):
    metrics = json.loads((output_dir / "metrics.json").read_text())
    for key in ("train_seconds", "train_samples", "eval_samples", *metric_keys):
        assert key in metrics, key
    for key in metric_keys:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["train_seconds"] > 0 and metrics["train_samples"] > 0 and metrics["eval_samples"] > 0
    png = (output_dir / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    return metrics


def load_saved(folder: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    return model, processor


# --- end to end -------------------------------------------------------------------------------------------


def test_digits_short_run_writes_metrics_curve_and_a_loadable_model(tmp_path):
    out = tmp_path / "digits"
    stdout = run_finetune("--output_dir", out, "--max_steps", 4, "--train_samples", 24, "--eval_samples", 6,
                          "--batch_size", 4, "--max_side", 192, "--seed", 3)
    metrics = check_artifacts(out, ["digit_accuracy", "quadrant_accuracy"])
    assert metrics["eval_samples"] == 6 and metrics["max_steps"] == 4 and metrics["seed"] == 3
    assert metrics["train_samples"] == 16  # 4 steps x 4 rows
    assert "A:" in stdout and "Which digit is shown and where?" in stdout  # the reloaded model answered

    # the budget curve: the held-out digits at each budget, lowered per call
    curve = metrics["budget_curve"]
    assert list(curve) == ["144", "64", "36", "16"]
    for budget, point in curve.items():
        assert 0 <= point["digit_accuracy"] <= 1 and 0 <= point["quadrant_accuracy"] <= 1
        assert 0 < point["mean_image_tokens"] <= int(budget)
    assert (metrics["digit_accuracy"], metrics["quadrant_accuracy"]) == (
        curve["144"]["digit_accuracy"], curve["144"]["quadrant_accuracy"])
    assert curve["16"]["mean_image_tokens"] < curve["144"]["mean_image_tokens"]
    assert "budget | digit" in stdout
    png = (out / "budget_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    card = (out / "model" / "README.md").read_text()
    assert "## Accuracy at each image-token budget" in card and "| 16 |" in card and "digit_accuracy" in card

    model, processor = load_saved(out / "model")
    assert type(model).__name__ == "NanoVLMForConditionalGeneration"
    assert processor.image_processor.max_image_size == 192
    assert processor.image_processor.shuffle_factors == list(model.config.shuffle_factors) == [2, 4]
    assert model.config.shared_cell_encoder
    sample = digits.DigitsTask(*digits.load_split()["test"], seed=0, max_side=192, limit=1)[0]
    prompt = training_tools.chat_prompt(processor, digits.QUESTION)
    inputs = processor(text=[prompt], images=[sample["image"]], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def make_backbones(root: Path):
    """A tiny random DINOv3 tower and a tiny Llama with an offline ChatML tokenizer, saved like Hub checkpoints."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, LlamaConfig, LlamaForCausalLM

    from offline_tokenizer import build_tokenizer

    torch.manual_seed(0)
    vision = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, patch_size=16, num_register_tokens=2))
    vision.save_pretrained(root / "vision")
    tokenizer = build_tokenizer(["What colour is the square? red green blue", "a red square", "a blue square"] * 5)
    tokenizer.save_pretrained(root / "text")
    text = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    text.save_pretrained(root / "text")
    return vision, text


def square_images(count, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    images, names = [], []
    for index in range(count):
        name = list(colours)[index % 3]
        height, width = int(rng.integers(24, 90)), int(rng.integers(24, 90))
        pixels = np.full((height, width, 3), 255, np.uint8)
        pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = colours[name]
        images.append(Image.fromarray(pixels))
        names.append(name)
    return images, names


def test_real_backbones_on_a_local_dataset(tmp_path):
    import datasets

    vision, _ = make_backbones(tmp_path)
    images, names = square_images(20)
    data = datasets.Dataset.from_dict(
        {"image": images, "question": ["What colour is the square?"] * 20, "answer": [f"a {n} square" for n in names]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}),
    )
    data.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "run"
    stdout = run_finetune("--vision_model", tmp_path / "vision", "--text_model", tmp_path / "text",
                          "--dataset", tmp_path / "data", "--output_dir", out, "--max_steps", 3, "--batch_size", 2,
                          "--eval_samples", 2, "--max_image_tokens", 16, "--max_side", 96, "--max_new_tokens", 4)
    metrics = check_artifacts(out, ["exact_match"])
    assert metrics["eval_samples"] == 2 and metrics["task"] == "dataset"  # a tenth of 20 rows held out
    assert "A:" in stdout

    model, processor = load_saved(out / "model")
    assert model.config.vision_config.hidden_size == 32 and model.config.text_config.hidden_size == 32
    assert processor.image_token_id == model.config.image_token_id
    # the tower started from the saved backbone (a few steps at lr 5e-5 move it very little)
    start = vision.embeddings.patch_embeddings.weight
    tuned = model.vision_tower.embeddings.patch_embeddings.weight
    assert torch.allclose(start, tuned, atol=1e-2) and not torch.allclose(start, torch.zeros_like(start))


def test_a_pretrained_lm_learns_the_built_in_task(tmp_path):
    """`--text_model` alone: the digits task with that LM, frozen, and a tower from scratch; then a second run
    taking the first run's tower (`--vision_model` a saved nanoVLM). Text-only answers are printed before/after."""
    _, text = make_backbones(tmp_path)
    settings = ["--max_steps", 2, "--batch_size", 4, "--train_samples", 8, "--eval_samples", 4, "--max_new_tokens", 3,
                "--recipe", "eval_budgets=[64]", "--recipe", "max_side=128"]
    out = tmp_path / "run"
    stdout = run_finetune("--text_model", tmp_path / "text", "--output_dir", out, *settings)
    metrics = check_artifacts(out, ["digit_accuracy", "quadrant_accuracy"])
    assert "text-only answers of" in stdout and "text-only answers after training:" in stdout
    assert metrics["text_answers_unchanged"] == len(digits_recipe.TEXT_QUESTIONS)  # the LM is frozen
    assert (out / "budget_curve.png").is_file()
    model, _ = load_saved(out / "model")
    for name, tensor in text.model.state_dict().items():
        if name != "embed_tokens.weight":  # (resized for <image>)
            assert torch.equal(model.language_model.state_dict()[name], tensor), name

    second = tmp_path / "second"
    run_finetune("--text_model", tmp_path / "text", "--vision_model", out / "model", "--output_dir", second,
                 "--max_steps", 1, *settings[2:])
    reloaded, _ = load_saved(second / "model")
    first_tower = model.vision_tower.embeddings.patch_embeddings.weight
    assert reloaded.config.vision_config.hidden_size == model.config.vision_config.hidden_size
    assert torch.allclose(reloaded.vision_tower.embeddings.patch_embeddings.weight, first_tower, atol=1e-2)


def test_dataset_rows_with_messages(tmp_path):
    import datasets

    from processing import NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor

    from offline_tokenizer import build_tokenizer

    images, names = square_images(6, seed=1)
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": name}]}]
        for name in names
    ]
    datasets.Dataset.from_dict({"images": [[image] for image in images], "messages": messages}).save_to_disk(
        str(tmp_path / "chat"))
    train, held_out = finetune_dataset.load_rows(str(tmp_path / "chat"), "train", None, eval_samples=2, seed=0)
    assert len(train) == 5 and len(held_out) == 1  # at most a tenth held out, at least one row

    tokenizer = build_tokenizer(["Colour? red green blue"] * 5)
    processor = NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=16, max_image_size=96), tokenizer)
    prompt, row_images, reference = finetune_dataset.question_and_reference(processor, NanoVLMCollator(processor),
                                                                             held_out[0])
    assert prompt.endswith("<|im_start|>assistant\n") and prompt.count("<image>") == 1
    assert len(row_images) == 1 and reference in names


def test_real_path_flags():
    with pytest.raises(SystemExit):
        finetune.parse_args(["--vision_model", "x"])
    with pytest.raises(SystemExit):
        finetune.parse_args(["--dataset", "d", "--text_model", "t"])
    assert finetune.parse_args(["--text_model", "lm.gguf"]).text_model == "lm.gguf"  # the built-in task, real LM
    args = finetune.parse_args([])
    assert args.output_dir == "outputs/digits" and args.max_steps is None and args.push_to_hub is None
    assert finetune.parse_args(["--push_to_hub", "me/nanovlm-digits"]).push_to_hub == "me/nanovlm-digits"


# --- the built-in task --------------------------------------------------------------------------------------


def test_split_is_fixed_stratified_and_disjoint():
    first, second = digits.load_split(), digits.load_split()
    train_images, train_labels = first["train"]
    test_images, test_labels = first["test"]
    assert len(train_labels) + len(test_labels) == 1797 and len(test_labels) == 360
    assert np.array_equal(test_images, second["test"][0])
    assert np.bincount(test_labels).tolist() == [36] * 10
    train_rows = {image.tobytes() for image in train_images}
    # held-out digits never appear in training (duplicated pixel arrays excepted: there are none across the split)
    assert not any(image.tobytes() in train_rows for image in test_images)


def test_layouts_vary_in_size_and_aspect_and_keep_away_from_midlines():
    task = digits.DigitsTask(*digits.load_split()["train"], seed=0, min_side=128, max_side=384)
    heights, widths = np.array(task.sizes()).T
    assert heights.min() >= 128 and widths.max() <= 384
    aspects = widths / heights
    assert aspects.min() < 0.5 and aspects.max() > 2.0 and len(set(task.sizes())) > 500
    counts = {q: 0 for q in digits.QUADRANTS}
    for index in range(0, len(task), 7):
        layout = task.layout(index)
        centre_y, centre_x = layout.top + layout.size / 2, layout.left + layout.size / 2
        assert 64 <= layout.size <= 96
        assert layout.top >= 0 and layout.left >= 0
        assert layout.top + layout.size <= layout.height and layout.left + layout.size <= layout.width
        assert abs(centre_y - layout.height / 2) >= 15.5 and abs(centre_x - layout.width / 2) >= 15.5
        counts[layout.quadrant] += 1
    assert min(counts.values()) > 0.2 * sum(counts.values())


def test_samples_are_deterministic_and_answers_match_the_image():
    train = digits.load_split()["train"]
    task = digits.DigitsTask(*train, seed=5, min_side=128, max_side=256)
    again = digits.DigitsTask(*train, seed=5, min_side=128, max_side=256)
    row = task[3]
    assert np.array_equal(np.asarray(row["image"]), np.asarray(again[3]["image"]))
    assert row["image"].size == task.canvas_size(3)[::-1]
    digit, quadrant = digits.parse_answer(row["answer"])
    assert digit == task.label(3) and quadrant == task.layout(3).quadrant
    # the bright pixels sit in the answered quadrant
    pixels = np.asarray(row["image"])[..., 0].astype(float)
    ys, xs = np.nonzero(pixels > 128)
    height, width = pixels.shape
    vertical = "top" if ys.mean() < height / 2 else "bottom"
    horizontal = "left" if xs.mean() < width / 2 else "right"
    assert quadrant == f"{vertical}-{horizontal}"
    task.set_epoch(1)
    assert task.sizes() != again.sizes() and task.label(3) == again.label(3)


@pytest.mark.parametrize(
    "text, expected",
    [("7 top-left", (7, "top-left")), ("3 bottom - right", (3, "bottom-right")), ("9", (9, None)),
     ("", (None, None)), ("4 Top Right", (4, "top-right"))],
)
def test_parse_answer(text, expected):
    assert digits.parse_answer(text) == expected


def test_curriculum_starts_small_and_reaches_the_full_range():
    schedule = digits_recipe.curriculum(10, 128, 384, start=0.3, full=0.7)
    sides = [schedule(epoch)[1] for epoch in range(10)]
    assert sides[:3] == [128, 128, 128] and sides[-3:] == [384, 384, 384]
    assert sides == sorted(sides)


def epoch_sampler(task, text_length, image_processor, **kwargs):
    """The recipe's sampler: re-planned at every epoch from the task's new layouts (`sizes_for_epoch`)."""
    from processing import BucketBatchSampler

    return BucketBatchSampler(task.sizes(), [text_length] * len(task), image_processor,
                              sizes_for_epoch=task.sizes_for_epoch, **kwargs)


def test_epoch_sampler_replans_sizes_every_epoch():
    from processing import NanoVLMImageProcessor

    image_processor = NanoVLMImageProcessor(max_image_tokens=144, max_image_size=384, shuffle_factors=(2,))
    schedule = digits_recipe.curriculum(4, 128, 384, start=0.25, full=0.75)
    task = digits.DigitsTask(*digits.load_split()["train"], seed=0, side_schedule=schedule, limit=200)
    sampler = epoch_sampler(task, 20, image_processor, batch_size=16, seed=0)
    counts = set()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        assert task.epoch == epoch
        batches = list(sampler)
        counts.add(len(batches))
        assert sorted(i for batch in batches for i in batch) == list(range(len(task)))
        planned = [sampler.lengths[i] for i in range(len(task))]
        actual = [20 + image_processor.num_image_tokens(*task.canvas_size(i)) for i in range(len(task))]
        assert planned == actual  # the sampler sees this epoch's sizes
        if epoch == 0:
            assert set(task.sizes()) == {(128, 128)}
    assert counts == {13}  # ceil(200 / 16), every epoch
    # resuming into epoch 2 after three batches gives that epoch's remaining batches
    sampler.set_epoch(2)
    expected = list(sampler)[3:]
    resumed_task = digits.DigitsTask(*digits.load_split()["train"], seed=0, side_schedule=schedule, limit=200)
    resumed = epoch_sampler(resumed_task, 20, image_processor, batch_size=16, seed=0)
    resumed.load_state_dict({"seed": 0, "epoch": 2, "num_batches_yielded": 3})
    resumed.set_epoch(2)
    assert list(resumed) == expected and resumed_task.sizes() == task.sizes()


def test_save_and_push_send_processor_and_metrics_with_the_model(tmp_path):
    calls = []

    class FakeModel:
        def save_pretrained(self, folder, processor=None, metrics=None):
            calls.append(("save", str(folder), processor, metrics))

        def push_to_hub(self, repo, processor=None, metrics=None):
            calls.append(("push", repo, processor, metrics))

    metrics = {"digit_accuracy": 0.9, "budget_curve": {"64": {"digit_accuracy": 0.9}}}
    training_tools.save_and_push(FakeModel(), "the processor", tmp_path, None, metrics=metrics)
    assert calls == [("save", str(tmp_path), "the processor", metrics)]
    calls.clear()
    training_tools.save_and_push(FakeModel(), "the processor", tmp_path, "me/digits", metrics=metrics)
    assert calls == [("save", str(tmp_path), "the processor", metrics), ("push", "me/digits", "the processor", metrics)]


def test_epoch_sampler_draws_budgets_and_knows_the_world_size():
    from processing import NanoVLMImageProcessor

    image_processor = NanoVLMImageProcessor(max_image_tokens=144, max_image_size=384, shuffle_factors=(2, 4))
    schedule = digits_recipe.curriculum(4, 128, 384, start=0.25, full=0.75)
    task = digits.DigitsTask(*digits.load_split()["train"], seed=0, side_schedule=schedule, limit=90)
    sampler = epoch_sampler(task, 20, image_processor, batch_size=8, seed=0, num_replicas=2,
                            budgets=[144, 64, 36, 16])
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) % 2 == 0 and sorted(key.index for batch in batches for key in batch) == list(range(90))
        assert {key.plan["max_image_tokens"] for batch in batches for key in batch} == {144, 64, 36, 16}
        lengths = {budget: sampler.lengths_at(budget) for budget in (144, 16)}
        assert lengths[144] == [20 + image_processor.num_image_tokens(*task.canvas_size(i)) for i in range(90)]
    assert lengths[16] != lengths[144]  # epoch 3 has the full canvas range: budget 16 plans fewer tokens


def test_perceiver_recipe_has_a_fixed_token_count_and_no_budget_draw():
    recipe = digits_recipe.recipe_from_args(finetune.parse_args(["--connector", "perceiver"]))
    assert recipe["connector"] == "perceiver" and recipe["train_budgets"] is None
    assert all(budget >= recipe["perceiver_latents"] for budget in recipe["eval_budgets"])
    model, processor = digits_recipe.build_digits_model(recipe, seed=0)
    assert model.config.connector == processor.image_processor.connector == "perceiver"
    assert processor.num_image_tokens(300, 200) == recipe["perceiver_latents"]
    with pytest.raises(SystemExit, match="unknown recipe key"):
        digits_recipe.recipe_from_args(finetune.parse_args(["--recipe", "budget=3"]))


def test_recipe_flags_change_recipe_values():
    args = finetune.parse_args(["--recipe", "max_side=256", "--recipe", "shuffle_factors=[2, 4]", "--batch_size", "4"])
    recipe = digits_recipe.recipe_from_args(args)
    assert recipe["max_side"] == 256 and recipe["shuffle_factors"] == (2, 4) and recipe["batch_size"] == 4
    assert {key: value for key, value in recipe.items() if key not in ("max_side", "shuffle_factors", "batch_size",
                                                                       "connector")} == {
        key: value for key, value in digits_recipe.RECIPE.items() if key not in ("max_side", "shuffle_factors",
                                                                                  "batch_size")}
    with pytest.raises(SystemExit, match="must be JSON"):
        digits_recipe.recipe_from_args(finetune.parse_args(["--recipe", "shuffle_factors=(2, 4)"]))
    with pytest.raises(SystemExit):  # the recipe belongs to the built-in task
        finetune.parse_args(["--vision_model", "v", "--text_model", "t", "--dataset", "d", "--recipe", "noise=0"])


def test_example_functions_stay_short():
    import ast

    for path in EXAMPLES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= 80, f"{path.name}: {node.name} has {lines} lines"


@pytest.mark.slow
def test_main_job_runs_under_torchrun_on_two_processes(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(EXAMPLES / "finetune.py"), "--threads", "1", "--output_dir", str(out), "--max_steps", "3",
               "--train_samples", "40", "--eval_samples", "4", "--batch_size", "4", "--max_side", "192"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_samples"] == 24  # 3 steps x 2 processes x 4 rows
    assert set(metrics["budget_curve"]) == {"144", "64", "36", "16"}
