"""Building the bucketing sampler at dataset scale: a million rows from size columns, and the header-reading helper.

    python benchmarks/sampler_build.py --json benchmarks/results/sampler_build.json
    python benchmarks/sampler_build.py --quick          # 100,000 rows, 200 photos (seconds)

See docs/performance.md#sampler-build.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from _common import benchmark_main, source_photos, table, timed, training_mix

OPTIONS = dict(rows=1_000_000, photos=4_000)
QUICK = dict(rows=100_000, photos=200)


def million_row_dataset(num_rows: int, seed: int):
    """`num_rows` rows: images (placeholder bytes: only the list lengths are read), image_sizes, text_length."""
    import datasets
    import pyarrow as pa

    distinct = min(num_rows, 20_000)  # sizes and lengths drawn from the mix, then resampled to num_rows rows
    mix = training_mix(distinct, seed=seed)
    rng = np.random.default_rng(seed)
    per_row = np.where(rng.random(num_rows) < 0.05, 2, 1)
    pick = rng.integers(0, distinct, int(per_row.sum()))
    sizes = np.asarray(mix["image_sizes"], dtype=np.int32)[pick]
    lengths = np.asarray(mix["text_lengths"], dtype=np.int32)[rng.integers(0, distinct, num_rows)]

    offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
    pairs = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * len(sizes) + 1, 2, dtype=np.int32)),
                                     pa.array(sizes.reshape(-1)))
    image = pa.StructArray.from_arrays([pa.array([b"x"] * len(sizes), pa.binary()), pa.nulls(len(sizes), pa.string())],
                                       names=["bytes", "path"])
    arrow = pa.table({"images": pa.ListArray.from_arrays(offsets, image),
                      "image_sizes": pa.ListArray.from_arrays(offsets, pairs),
                      "text_length": pa.array(lengths)})
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "image_sizes": datasets.List(datasets.List(datasets.Value("int32"))),
                                  "text_length": datasets.Value("int32")})
    return datasets.Dataset(datasets.table.InMemoryTable(arrow), info=datasets.DatasetInfo(features=features))


def build_from_columns(num_rows: int, seed: int) -> dict:
    from processing import BucketBatchSampler, NanoVLMImageProcessor
    from processing.training.sizes import dataset_image_sizes, dataset_text_lengths

    dataset = million_row_dataset(num_rows, seed)
    image_processor = NanoVLMImageProcessor(max_image_tokens=256, max_image_size=1024)
    sampler, total = timed(BucketBatchSampler.from_dataset, dataset, image_processor, text_length="text_length",
                           batch_size=16, seed=seed)
    read_sizes = timed(dataset_image_sizes, dataset)[1]
    read_lengths = timed(dataset_text_lengths, dataset, "text_length", None)[1]
    next_epoch = timed(sampler.batches, 1)[1]
    return {
        "rows": num_rows,
        "images": int(sum(len(shapes) for shapes in sampler.shapes)),
        "distinct_image_sizes": len(sampler._plans),
        "batches": sampler.num_batches,
        "from_dataset_seconds": round(total, 2),
        "read_size_column_seconds": round(read_sizes, 2),
        "read_text_length_column_seconds": round(read_lengths, 2),
        "next_epoch_batches_seconds": round(next_epoch, 2),
    }


def photo_dataset(folder: Path, num_rows: int, seed: int):
    """`num_rows` rows of real photos re-encoded at varied sizes (JPEG, 1 in 4 PNG; 1 in 10 rows with two)."""
    import datasets
    from PIL import Image

    sources = source_photos()
    names = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")
    photos = [Image.fromarray(sources[name]) for name in names]
    rng = np.random.default_rng(seed)
    encoded = []
    for index in range(64):  # distinct encodings, reused across rows
        photo = photos[index % len(photos)]
        scale = rng.uniform(0.3, 1.0)
        resized = photo.resize((max(16, int(photo.width * scale)), max(16, int(photo.height * scale))))
        buffer = io.BytesIO()
        resized.save(buffer, format="PNG" if index % 4 == 3 else "JPEG", quality=90)
        encoded.append((buffer.getvalue(), (resized.height, resized.width)))
    rows, truth = [], []
    for _ in range(num_rows):
        picks = rng.integers(0, len(encoded), 2 if rng.random() < 0.1 else 1)
        rows.append([{"bytes": encoded[p][0], "path": None} for p in picks])
        truth.append([list(encoded[p][1]) for p in picks])
    features = datasets.Features({"images": datasets.List(datasets.Image()), "text_length": datasets.Value("int32")})
    dataset = datasets.Dataset.from_dict({"images": rows, "text_length": [20] * num_rows}, features=features)
    dataset.save_to_disk(str(folder))
    return truth


def header_helper(num_rows: int, seed: int) -> dict:
    import datasets

    from processing import BucketBatchSampler, NanoVLMImageProcessor, add_image_sizes

    datasets.disable_progress_bars()
    results = {"rows": num_rows}
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        truth = photo_dataset(root / "photos", num_rows, seed)
        for num_proc in (1, 2):
            # a fresh copy per setting: the cache of the first call would answer the second
            copy = root / f"copy{num_proc}"
            datasets.load_from_disk(str(root / "photos")).save_to_disk(str(copy))
            dataset = datasets.load_from_disk(str(copy))
            with_sizes, seconds = timed(add_image_sizes, dataset, num_proc=num_proc if num_proc > 1 else None)
            results[f"rows_per_second_num_proc_{num_proc}"] = round(num_rows / seconds)
            if num_proc == 1:
                assert with_sizes["image_sizes"] == truth, "add_image_sizes disagrees with the decoded sizes"
                again, seconds = timed(add_image_sizes, datasets.load_from_disk(str(copy)))
                results["cached_call_seconds"] = round(seconds, 3)
                assert again["image_sizes"] == truth
                image_processor = NanoVLMImageProcessor(max_image_tokens=256, max_image_size=1024)
                from_column = BucketBatchSampler.from_dataset(with_sizes, image_processor, "text_length", batch_size=8)
                from_headers = BucketBatchSampler.from_dataset(dataset, image_processor, "text_length", batch_size=8)
                assert from_column.lengths == from_headers.lengths and from_column.keys == from_headers.keys
                results["sampler_from_column_equals_from_headers"] = True
    return results


def report(figures: dict) -> str:
    """The two tables: building the sampler from columns, and reading sizes from headers."""
    build, headers = figures["from_columns"], figures["add_image_sizes"]
    columns = table(["rows", "images", "distinct sizes", "batches", "from_dataset s", "read sizes s", "read lengths s",
                     "next epoch s"],
                    [[build["rows"], build["images"], build["distinct_image_sizes"], build["batches"],
                      build["from_dataset_seconds"], build["read_size_column_seconds"],
                      build["read_text_length_column_seconds"], build["next_epoch_batches_seconds"]]],
                    title="BucketBatchSampler.from_dataset from an image_sizes + text_length column")
    header_table = table(["rows", "rows/s num_proc=1", "rows/s num_proc=2", "cached call s", "1M rows at num_proc=1 s"],
                         [[headers["rows"], headers["rows_per_second_num_proc_1"],
                           headers["rows_per_second_num_proc_2"], headers["cached_call_seconds"],
                           headers["seconds_per_million_rows_num_proc_1"]]],
                         title="add_image_sizes on real encoded photos (headers only)")
    return f"{columns}\n\n{header_table}"


def run(args) -> dict:
    build = build_from_columns(args.rows, args.seed)
    headers = header_helper(args.photos, args.seed)
    headers["seconds_per_million_rows_num_proc_1"] = round(1_000_000 / headers["rows_per_second_num_proc_1"])
    return {"settings": {"rows": args.rows, "photos": args.photos, "seed": args.seed, "quick": args.quick},
            "from_columns": build, "add_image_sizes": headers}


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, OPTIONS, QUICK, run, report)


if __name__ == "__main__":
    main()
