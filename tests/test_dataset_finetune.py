"""`examples/finetune.py --vision_model V --text_model T --dataset D --dataset_config SUBSET` on Cauldron-schema rows.

The backbones are tiny random checkpoints saved in the Hub layout (a DINOv3 ViT; a Llama with an offline ChatML
tokenizer: `test_finetune.make_backbones`); the dataset is a local copy laid out like the Cauldron (one sub-folder per
subset) of real photos (scikit-image, scikit-learn), with multi-image and multi-turn rows and two bad rows.
"""

import numpy as np
import pytest
import torch

from processing import NanoVLMCollator

from test_cauldron import encoded, photos
from test_finetune import check_artifacts, finetune, finetune_dataset, load_saved, make_backbones, run_finetune

datasets = pytest.importorskip("datasets")

NAMES = ["an astronaut", "a cup of coffee", "a cat", "a rocket", "a temple", "a flower"]


def cauldron_rows(count, seed, empty_answer=None, broken_image=None):
    """Rows of the Cauldron schema: 1 in 3 with two photos, 1 in 4 with two turns; two rows may be made bad."""
    pictures = photos()
    rng = np.random.default_rng(seed)
    images, texts = [], []
    for index in range(count):
        first = int(rng.integers(len(pictures)))
        size = (int(rng.integers(24, 80)), int(rng.integers(24, 80)))
        row_images = [{"bytes": encoded(pictures[first], *size), "path": None}]
        turns = [{"user": "What is in the picture?", "assistant": NAMES[first], "source": "photos"}]
        if index % 3 == 1:
            second = (first + 1) % len(pictures)
            row_images.append({"bytes": encoded(pictures[second], 40, 32, "PNG"), "path": None})
            turns = [{"user": "What is in the second picture?", "assistant": NAMES[second], "source": "photos"}]
        if index % 4 == 2:
            turns.append({"user": "And in the first?", "assistant": NAMES[first], "source": "photos"})
        if index == empty_answer:
            turns[0]["assistant"] = ""
        if index == broken_image:
            row_images[0] = {"bytes": b"\x89PNG truncated", "path": None}
        images.append(row_images)
        texts.append(turns)
    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                "source": datasets.Value("string")}),
    })
    return datasets.Dataset.from_dict({"images": images, "texts": texts}, features=features)


@pytest.fixture(scope="module")
def local_cauldron(tmp_path_factory):
    root = tmp_path_factory.mktemp("cauldron")
    make_backbones(root)
    splits = {"train": cauldron_rows(14, 0, empty_answer=3, broken_image=5),
              "test": cauldron_rows(5, 1, empty_answer=1)}
    datasets.DatasetDict(splits).save_to_disk(str(root / "the_cauldron" / "photos"))
    return root


@pytest.mark.slow  # ~15-30 s on 2 shared cores: one short training run in a subprocess
def test_cauldron_subset_fine_tunes_evaluates_saves_and_reloads(local_cauldron, tmp_path):
    root, out = local_cauldron, tmp_path / "run"
    stdout = run_finetune("--vision_model", root / "vision", "--text_model", root / "text",
                          "--dataset", root / "the_cauldron", "--dataset_config", "photos", "--skip_bad_rows",
                          "--output_dir", out, "--max_steps", 4, "--batch_size", 4, "--eval_samples", 5,
                          "--max_image_tokens", 16, "--max_side", 96, "--max_new_tokens", 4)
    metrics = check_artifacts(out, ["exact_match"])
    assert metrics["dataset_config"] == "photos" and metrics["task"] == "dataset"
    # 14 rows, batches of 4: one epoch in 4 steps, so each bad training row came once and was skipped
    assert metrics["skipped_train_rows"] == 2 and metrics["skipped_eval_rows"] == 1 and metrics["eval_samples"] == 4
    assert "skipped bad rows: 2 in training, 1 held out" in stdout and "dataset row 3" in stdout
    assert metrics["reloaded_answer_matches"] is True

    model, processor = load_saved(out / "model")
    assert type(model).__name__ == "NanoVLMForConditionalGeneration"
    assert processor.image_processor.max_image_tokens == 16 and model.config.vision_config.hidden_size == 32
    row = {"images": [photos()[2].resize((64, 48)), photos()[3].resize((40, 40))],
           "texts": [{"user": "What is in the second picture?", "assistant": "a rocket"}]}
    prompt, images, reference = finetune_dataset.question_and_reference(processor, NanoVLMCollator(processor), row)
    assert prompt.count("<image>") == 2 and reference == "a rocket"
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_bad_rows_stop_the_run_naming_the_dataset_row(local_cauldron, tmp_path):
    root = local_cauldron
    args = ["--vision_model", str(root / "vision"), "--text_model", str(root / "text"),
            "--dataset", str(root / "the_cauldron"), "--dataset_config", "photos", "--output_dir", str(tmp_path),
            "--max_steps", "1", "--threads", "1"]
    with pytest.raises(ValueError, match="dataset row 5, image 0 of the row: cannot read image header"):
        finetune.main(args)  # the sizes are read before training starts


def test_load_rows_dataset_config(local_cauldron):
    root = local_cauldron
    train, held_out = finetune_dataset.load_rows(str(root / "the_cauldron"), "train", None, 3, 0, config="photos")
    assert len(train) == 14 and len(held_out) == 3 and train["__index__"] == list(range(14))
    assert set(train[0]["images"][0]) == {"bytes", "path"}  # decoded by the collator, where bad images are handled
    with pytest.raises(ValueError, match="no sub-folder 'vqav2'"):
        finetune_dataset.load_rows(str(root / "the_cauldron" / "photos"), "train", None, 3, 0, config="vqav2")
    with pytest.raises(ValueError, match="no split 'validation'"):
        finetune_dataset.load_rows(str(root / "the_cauldron"), "validation", None, 3, 0, config="photos")


def test_load_rows_reads_a_data_folder_laid_out_like_the_hub_repository(tmp_path):
    """A local copy of the Cauldron's Hub repository: `<root>/<subset>/<split>-00000-of-00001.parquet`."""
    subset = tmp_path / "the_cauldron" / "photos"
    subset.mkdir(parents=True)
    cauldron_rows(6, 0).to_parquet(str(subset / "train-00000-of-00001.parquet"))
    cauldron_rows(3, 1).to_parquet(str(subset / "test-00000-of-00001.parquet"))
    train, held_out = finetune_dataset.load_rows(str(tmp_path / "the_cauldron"), "train", None, 2, 0, config="photos")
    assert len(train) == 6 and len(held_out) == 2  # the test split, not a split-off part of train
    assert train[0]["texts"][0]["source"] == "photos" and set(train[0]["images"][0]) == {"bytes", "path"}
