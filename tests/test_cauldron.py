"""The Cauldron / FineVision row schema (`images` + `texts` turns), bad rows, and image sizes at dataset scale.

Photos are real (scikit-image and scikit-learn samples), re-encoded small so the tests stay fast.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from processing import (
    BucketBatchSampler,
    NanoVLMCollator,
    NanoVLMImageProcessor,
    NanoVLMProcessor,
    add_image_sizes,
    add_text_lengths,
    keep_images_encoded,
)
from processing.training.collator import BadRowError

from offline_tokenizer import build_tokenizer
from test_collator import labelled_spans

datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_tokenizer(["What is in the picture? An astronaut, a cup of coffee, a cat, a rocket."] * 20)
    return NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=16, max_image_size=128), tokenizer)


@pytest.fixture(scope="module")
def collator(processor):
    return NanoVLMCollator(processor)


def photos():
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), *load_sample_images().images]
    return [Image.fromarray(array) for array in arrays]


def encoded(photo, height, width, format="JPEG") -> bytes:
    buffer = io.BytesIO()
    photo.resize((width, height)).save(buffer, format=format)
    return buffer.getvalue()


# --- the row schema ---------------------------------------------------------------------------------------------


def test_multi_turn_row_labels_every_answer_and_puts_the_image_before_the_first_user_turn(collator, processor):
    astronaut = photos()[0].resize((64, 64))
    row = {"images": [astronaut], "texts": [
        {"user": "What is in the picture?", "assistant": "An astronaut.", "source": "vqa"},
        {"user": "And the colour?", "assistant": "White, a cup of coffee."},
    ]}
    messages, images = collator.conversation(row)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "<image>What is in the picture?" and messages[2]["content"] == "And the colour?"
    assert images == [astronaut]

    batch = collator([row])
    spans = labelled_spans(batch["labels"][0])
    answers = [processor.decode(span) for span in spans]
    assert answers == ["An astronaut.<|im_end|>", "White, a cup of coffee.<|im_end|>"]
    text = processor.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1])
    first_user = text.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    planned = processor.image_processor.num_image_tokens(64, 64)
    assert text[first_user:].startswith("<image>" * planned + "What is in the picture?")
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == planned
    # the "source" key changes nothing
    without_source = {"images": [astronaut], "texts": [{k: v for k, v in turn.items() if k != "source"}
                                                       for turn in row["texts"]]}
    assert torch.equal(collator([without_source])["input_ids"], batch["input_ids"])


def test_multi_image_rows_keep_every_image_in_order(collator, processor):
    cat, rocket = photos()[2].resize((96, 48)), photos()[3].resize((40, 80))
    front = {"images": [cat, rocket], "texts": [{"user": "Which is the cat?", "assistant": "The first."}]}
    messages, images = collator.conversation(front)
    assert messages[0]["content"].startswith("<image><image>Which") and images == [cat, rocket]
    placed = {"images": [cat, rocket], "texts": [{"user": "Look: <image>", "assistant": "A cat."},
                                                 {"user": "And now <image>?", "assistant": "A rocket."}]}
    messages, _ = collator.conversation(placed)
    assert messages[0]["content"] == "Look: <image>" and messages[2]["content"] == "And now <image>?"  # kept where put

    batch = collator([front, placed])
    tokens = [processor.image_processor.num_image_tokens(*size) for size in ((48, 96), (80, 40))]
    for index in range(2):
        assert int((batch["input_ids"][index] == processor.image_token_id).sum()) == sum(tokens)
    assert batch["image_grid_hw"].shape[0] == 4
    answers = [processor.decode(span) for span in labelled_spans(batch["labels"][1])]
    assert answers == ["A cat.<|im_end|>", "A rocket.<|im_end|>"]


def test_text_length_of_a_cauldron_row_is_what_the_batch_holds(collator, processor):
    row = {"images": [photos()[1].resize((64, 32))], "texts": [
        {"user": "What is this?", "assistant": "A cup of coffee."}, {"user": "Hot?", "assistant": "Yes."}]}
    batch = collator([row])
    text_tokens = int(batch["attention_mask"][0].sum()) - int((batch["input_ids"][0] == processor.image_token_id).sum())
    assert collator.text_length({"texts": row["texts"]}) == text_tokens


def test_undecoded_datasets_images_are_read_by_the_collator(collator):
    photo = encoded(photos()[2], 48, 64)
    decoded = collator([{"images": [Image.open(io.BytesIO(photo))], "texts": [{"user": "?", "assistant": "A cat."}]}])
    struct = collator([{"images": [{"bytes": photo, "path": None}], "texts": [{"user": "?", "assistant": "A cat."}]}])
    assert torch.equal(decoded["pixel_values"], struct["pixel_values"])


# --- bad rows ------------------------------------------------------------------------------------------------------


def good(index):
    return {"__index__": index, "images": [photos()[0].resize((32, 32))],
            "texts": [{"user": "What is it?", "assistant": "An astronaut."}]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"texts": [{"user": "What is it?", "assistant": ""}]},
         "dataset row 1234: turn 0 of 'texts' has an empty answer"),
        ({"texts": [{"user": "Hi", "assistant": "A."}, {"user": "?", "assistant": "  "}]}, "dataset row 1234: turn 1"),
        ({"texts": []}, "dataset row 1234: 'texts' must be a non-empty list"),
        ({"texts": [{"assistant": "A."}]}, "dataset row 1234: turn 0 of 'texts' must be a dict with a 'user' string"),
        ({"images": [b"not an image"]}, "dataset row 1234, image 0 of the row: cannot decode"),
        ({"images": [None]}, "dataset row 1234, image 0 of the row: the image is missing"),
        ({"images": [{"bytes": None, "path": None}]}, "dataset row 1234, image 0 of the row: image entry"),
    ],
)
def test_a_bad_row_is_an_error_naming_its_dataset_index(collator, bad, message):
    row = {**good(1234), **bad}
    with pytest.raises(ValueError, match=message) as raised:
        collator([good(7), row])
    assert "skip_bad_rows=True" in str(raised.value)


def test_without_an_index_the_error_names_the_place_in_the_batch(collator):
    row = {"images": [b"broken"], "texts": [{"user": "?", "assistant": "A."}]}
    with pytest.raises(ValueError, match="row 1, image 0 of the row: cannot decode"):
        collator([{k: v for k, v in good(0).items() if k != "__index__"}, row])


def test_skip_bad_rows_drops_and_counts_them(processor):
    collator = NanoVLMCollator(processor, skip_bad_rows=True)
    empty = {**good(11), "texts": [{"user": "?", "assistant": ""}]}
    broken = {**good(12), "images": [b"broken"]}
    batch = collator([good(10), empty, broken, good(13)])
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_hw"].shape[0] == 2
    assert collator.skipped_rows == 2
    assert "dataset row 11" in collator.skipped_examples[0] and "dataset row 12" in collator.skipped_examples[1]
    reference = NanoVLMCollator(processor)([good(10), good(13)])
    assert torch.equal(batch["input_ids"], reference["input_ids"]) and torch.equal(batch["labels"], reference["labels"])
    assert collator.text_length({"texts": empty["texts"]}) == 0  # the sampler needs a number; the row is skipped later

    with pytest.raises(BadRowError, match="all 2 rows of this batch are bad"):
        collator([empty, broken])
    assert collator.skipped_rows == 4


# --- image sizes at scale ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """A saved dataset of real photos: 12 rows, 1 or 2 images each, JPEG and PNG, sizes known."""
    root = tmp_path_factory.mktemp("photos")
    pictures = photos()
    rng = np.random.default_rng(0)
    rows, truth = [], []
    for index in range(12):
        count = 2 if index % 4 == 0 else 1
        sizes = [(int(rng.integers(20, 120)), int(rng.integers(20, 120))) for _ in range(count)]
        rows.append([{"bytes": encoded(pictures[(index + k) % 6], h, w, "PNG" if k else "JPEG"), "path": None}
                     for k, (h, w) in enumerate(sizes)])
        truth.append([list(size) for size in sizes])
    texts = [[{"user": "What is it?", "assistant": "A photo " * (1 + index % 3)}] for index in range(12)]
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({"user": datasets.Value("string"),
                                                          "assistant": datasets.Value("string")})})
    datasets.Dataset.from_dict({"images": rows, "texts": texts}, features=features).save_to_disk(str(root / "data"))
    return root / "data", truth


def test_add_image_sizes_reads_headers_only_and_is_cached(photo_folder, monkeypatch):
    folder, truth = photo_folder
    dataset = datasets.load_from_disk(str(folder))

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with_sizes = add_image_sizes(dataset)
    assert with_sizes["image_sizes"] == truth
    assert with_sizes.column_names == ["images", "texts", "image_sizes"] and len(with_sizes) == len(dataset)
    monkeypatch.undo()
    decoded = with_sizes[3]["images"][0]  # the image column is unchanged: still decoded on access
    assert [decoded.height, decoded.width] == truth[3][0]

    # cached like any datasets transform: the second call reads the map's cache file back
    again = add_image_sizes(datasets.load_from_disk(str(folder)))
    assert [f["filename"] for f in again.cache_files] == [f["filename"] for f in with_sizes.cache_files]
    assert any("cache-" in f["filename"] for f in again.cache_files)

    # after a shuffle (an indices mapping), sizes still follow the rows
    shuffled = dataset.shuffle(seed=1)
    order = shuffled._indices.column("indices").to_pylist()
    assert add_image_sizes(shuffled)["image_sizes"] == [truth[i] for i in order]


def test_add_image_sizes_names_a_broken_row_or_records_none(tmp_path):
    good_image = {"bytes": encoded(photos()[0], 30, 40), "path": None}
    dataset = datasets.Dataset.from_dict(
        {"image": [good_image, {"bytes": b"broken", "path": None}]},
        features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(ValueError, match="dataset row 1, image 0 of the row: cannot read image header"):
        add_image_sizes(dataset)
    skipped = add_image_sizes(dataset, skip_bad_images=True)
    assert skipped["image_sizes"] == [[[30, 40]], [None]]
    ip = NanoVLMImageProcessor(max_image_tokens=16, max_image_size=128)
    sampler = BucketBatchSampler.from_dataset(skipped, ip, lambda row: 5, batch_size=2)
    assert sampler.lengths == [5 + ip.num_image_tokens(30, 40), 5]  # the unreadable image counts no tokens


def test_text_length_errors_name_the_dataset_row(processor):
    dataset = datasets.Dataset.from_dict({"texts": [[{"user": "?", "assistant": "A cat."}]] * 2
                                          + [[{"user": "?", "assistant": ""}]]})
    with pytest.raises(ValueError, match="dataset row 2: turn 0 of 'texts' has an empty answer"):
        add_text_lengths(dataset, NanoVLMCollator(processor).text_length)
    with pytest.raises(ValueError, match="dataset row 2: turn 0 of 'texts' has an empty answer"):
        BucketBatchSampler.from_dataset(dataset.add_column("height", [9] * 3).add_column("width", [9] * 3),
                                        NanoVLMImageProcessor(), NanoVLMCollator(processor).text_length, batch_size=2)
    lengths = add_text_lengths(dataset, NanoVLMCollator(processor, skip_bad_rows=True).text_length)["text_length"]
    assert lengths[0] == lengths[1] > 0 and lengths[2] == 0


def test_columns_join_a_selection_without_copying_its_images(photo_folder, processor):
    folder, truth = photo_folder
    dataset = datasets.load_from_disk(str(folder))
    (original,) = [f["filename"] for f in dataset.cache_files]
    picked = dataset.shuffle(seed=3).select(range(5))
    order = picked._indices.column("indices").to_pylist()
    collator = NanoVLMCollator(processor)
    joined = add_text_lengths(add_image_sizes(picked), collator.text_length)
    assert joined["image_sizes"] == [truth[i] for i in order] and len(joined) == 5
    from_columns = BucketBatchSampler.from_dataset(joined, processor.image_processor, "text_length", batch_size=2)
    from_headers = BucketBatchSampler.from_dataset(picked, processor.image_processor, collator.text_length,
                                                   batch_size=2)
    assert from_columns.lengths == from_headers.lengths
    assert joined["text_length"] == [collator.text_length({"texts": dataset[i]["texts"]}) for i in order]
    assert [joined[k]["texts"] for k in range(5)] == [dataset[i]["texts"] for i in order]
    images_bytes = Path(original).stat().st_size
    for cache in {f["filename"] for f in joined.cache_files} - {original}:  # only the small new columns were written
        assert Path(cache).stat().st_size < images_bytes / 10, cache


def test_sampler_sizes_from_columns_equal_sizes_from_headers(photo_folder, processor):
    folder, truth = photo_folder
    dataset = datasets.load_from_disk(str(folder))
    ip = processor.image_processor
    collator = NanoVLMCollator(processor)
    from_headers = BucketBatchSampler.from_dataset(dataset, ip, collator.text_length, batch_size=3)
    with_columns = add_text_lengths(add_image_sizes(dataset), collator.text_length)
    from_columns = BucketBatchSampler.from_dataset(with_columns, ip, "text_length", batch_size=3)
    expected = BucketBatchSampler(truth, [collator.text_length({"texts": t}) for t in dataset["texts"]], ip,
                                  batch_size=3)
    for sampler in (from_headers, from_columns):
        assert sampler.lengths == expected.lengths and sampler.keys == expected.keys
        assert sampler.shapes == expected.shapes and sampler.batches(0) == expected.batches(0)

    # a list of rows with an image_sizes key
    rows = [{"image_sizes": sizes, "n": 5} for sizes in truth]
    assert BucketBatchSampler.from_dataset(rows, ip, "n", batch_size=3).lengths == \
        BucketBatchSampler(truth, [5] * 12, ip, batch_size=3).lengths

    # one image per row: height / width columns
    single = datasets.Dataset.from_dict({"height": [h for (h, w), *_ in truth], "width": [w for (h, w), *_ in truth],
                                         "n": [5] * 12})
    from_hw = BucketBatchSampler.from_dataset(single, ip, "n", batch_size=3)
    assert from_hw.lengths == BucketBatchSampler([s[0] for s in truth], [5] * 12, ip, batch_size=3).lengths

    # a size column that disagrees with the images is refused
    stale = with_columns.remove_columns(["image_sizes"]).add_column("image_sizes", [[s[0]] for s in truth])
    with pytest.raises(ValueError, match="'image_sizes' column disagrees with the 'images' column on 3 rows"):
        BucketBatchSampler.from_dataset(stale, ip, "text_length", batch_size=3)


def test_keep_images_encoded_changes_no_data(photo_folder):
    folder, _ = photo_folder
    dataset = datasets.load_from_disk(str(folder))
    kept = keep_images_encoded(dataset)
    assert kept.cache_files == dataset.cache_files  # the same Arrow file, nothing rewritten
    assert set(kept[0]["images"][0]) == {"bytes", "path"} and isinstance(dataset[0]["images"][0], Image.Image)


@pytest.mark.slow  # ~10-20 s: a subprocess importing datasets and torch, and a 2-process map
def test_sampler_build_benchmark_quick(tmp_path):
    out = tmp_path / "sampler_build.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sampler_build.py"), "--quick", "--rows", "20000", "--photos", "40",
         "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    figures = json.loads(out.read_text())
    build, headers = figures["from_columns"], figures["add_image_sizes"]
    assert build["rows"] == 20000 and build["images"] > 20000 and build["batches"] >= 20000 // 16
    assert build["from_dataset_seconds"] > 0 and headers["rows_per_second_num_proc_1"] > 0
    assert headers["sampler_from_column_equals_from_headers"] is True
    assert "from_dataset" in completed.stdout and "rows/s" in completed.stdout
