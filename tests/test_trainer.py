"""NanoVLMTrainer on the tiny model: training steps, exact resume, and loss normalisation under accumulation."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer, tiny_config
from processing import BucketBatchSampler, NanoVLMCollator, NanoVLMImageProcessor, NanoVLMProcessor

from offline_tokenizer import build_tokenizer

ANSWERS = ["7", "The digit 3, top left.", "1 bottom right", "The digit 9 is at the top right of the picture."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_tokenizer(["Which digit is shown and where? " + " ".join(ANSWERS)] * 20)
    return NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=16, max_image_size=256), tokenizer)


def make_rows(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (int(rng.integers(32, 160)), int(rng.integers(32, 160)), 3), dtype=np.uint8),
            "prompt": "Which digit is shown and where?",
            "answer": ANSWERS[index % len(ANSWERS)],
        }
        for index in range(count)
    ]


def make_trainer(output_dir, rows, processor, trainer_kwargs=None, **overrides):
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(tiny_config())
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=2e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return NanoVLMTrainer(
        model=model, args=TrainingArguments(**settings), train_dataset=rows, processing_class=processor,
        **(trainer_kwargs or {}),
    )


def step_losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def weights(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_training_steps_with_accumulation_and_checkpointing(tmp_path, processor):
    datasets = pytest.importorskip("datasets")
    rows = make_rows(8)
    encoded = []
    for row in rows:  # a real image column: PNG bytes that the dataset decodes to PIL on access
        buffer = io.BytesIO()
        Image.fromarray(row["image"]).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    dataset = datasets.Dataset.from_dict(
        {"image": encoded, "prompt": [row["prompt"] for row in rows], "answer": [row["answer"] for row in rows]},
        features=datasets.Features(
            {"image": datasets.Image(), "prompt": datasets.Value("string"), "answer": datasets.Value("string")}
        ),
    )
    trainer = make_trainer(
        tmp_path, dataset, processor, gradient_accumulation_steps=2, activation_checkpointing=True, max_steps=3
    )
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the LM loss
    before = weights(trainer.model)
    trainer.train()

    assert isinstance(trainer.train_batch_sampler, BucketBatchSampler)
    assert trainer.args.remove_unused_columns is False
    assert trainer.model.is_activation_checkpointing
    losses = step_losses(trainer)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
    after = weights(trainer.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "model.language_model.embed_tokens.weight" in changed
    assert any(name.startswith("model.vision_tower.") for name in changed)
    assert any(name.startswith("model.connector.") for name in changed)


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_losses(tmp_path, processor):
    rows = make_rows(8)
    # 4 batches per epoch, 2 optimizer steps per epoch: the checkpoint at step 3 is mid-way through epoch 1.
    settings = dict(gradient_accumulation_steps=2, max_steps=5, save_strategy="steps", save_steps=3)
    uninterrupted = make_trainer(tmp_path / "full", rows, processor, **settings)
    uninterrupted.train()

    resumed = make_trainer(tmp_path / "resumed", rows, processor, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))

    expected, got = step_losses(uninterrupted), step_losses(resumed)
    assert sorted(expected) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(expected[step], rel=1e-5)
    for name, value in weights(uninterrupted.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_accumulated_loss_and_update_equal_one_big_batch(tmp_path, processor):
    rows = make_rows(4)  # answers of 1 to 15 tokens: a mean of micro-batch means would weight them wrongly
    sgd = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1)
    big = make_trainer(tmp_path / "big", rows, processor, per_device_train_batch_size=4, **sgd)
    big.train()
    accumulated = make_trainer(tmp_path / "accumulated", rows, processor, gradient_accumulation_steps=2, **sgd)
    accumulated.train()

    big_loss = step_losses(big)[1]
    assert step_losses(accumulated)[1] == pytest.approx(big_loss, rel=1e-5)
    for name, value in weights(big.model).items():
        torch.testing.assert_close(accumulated.model.state_dict()[name], value, rtol=1e-4, atol=1e-6)

    # The check has teeth: weighting each micro-batch equally gives a clearly different loss.
    torch.manual_seed(0)
    fresh = NanoVLMForConditionalGeneration(tiny_config())
    collator = NanoVLMCollator(processor)
    with torch.no_grad():
        micro_batches = accumulated.train_batch_sampler.batches(0)
        micro_losses = [fresh(**collator([rows[i] for i in batch])).loss.item() for batch in micro_batches]
    assert abs(np.mean(micro_losses) - big_loss) > 1e-3


def test_token_budget_batches_and_sampler_checks(tmp_path, processor):
    rows = make_rows(10)
    trainer = make_trainer(tmp_path, rows, processor, max_steps=2, trainer_kwargs={"max_tokens_per_batch": 120})
    trainer.train()
    sampler = trainer.train_batch_sampler
    assert sampler.batch_size is None and len(trainer.get_train_dataloader()) == len(sampler)
    assert all(len(batch) * max(sampler.lengths[i] for i in batch) <= 120 for batch in sampler.batches(0))

    wrong = BucketBatchSampler.from_dataset(
        rows, processor.image_processor, NanoVLMCollator(processor).text_length, batch_size=2, num_replicas=2
    )
    trainer = make_trainer(tmp_path, rows, processor, max_steps=1, trainer_kwargs={"batch_sampler": wrong})
    with pytest.raises(ValueError, match="num_replicas=2"):
        trainer.get_train_dataloader()
