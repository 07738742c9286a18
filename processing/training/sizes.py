"""Image sizes and text lengths of a whole dataset, for the bucketing sampler, without decoding any image.

The sampler needs every row's image sizes (for the plan) and text length. At the scale of the Cauldron or
FineVision (millions of rows), opening every image file when the sampler is built is too slow, so sizes are read
from columns when the dataset has them:
  - `image_sizes`: per row, a list of [height, width], one per image (what `add_image_sizes` writes), or
  - `height` and `width`: one image per row (numbers), or one list of sides per row.
Otherwise they are read from the image files' headers, row by row (`datasets` image columns are read as raw bytes).

`add_image_sizes(dataset, num_proc=8)` adds the `image_sizes` column once with `datasets.Dataset.map` (headers
only, in parallel); `map`'s fingerprint caches the result like any other `datasets` transform, so the next run reads
it back from the cache. `add_text_lengths` does the same for text lengths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..image_loading import ImageInputError, image_size

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

IMAGE_SIZES_COLUMN = "image_sizes"
TEXT_LENGTH_COLUMN = "text_length"
IMAGE_COLUMNS = ("images", "image")
INDEX_KEY = "__index__"  # reserved row key: the row's index in its dataset (or stream); errors about a row name it


def find_image_column(column_names, image_column: str | None = None) -> str | None:
    """The image column: `image_column` (checked), else "images" or "image", else None."""
    if image_column is not None:
        if image_column not in column_names:
            raise ValueError(f"image_column {image_column!r} is not among the columns {list(column_names)}")
        return image_column
    return next((name for name in IMAGE_COLUMNS if name in column_names), None)


def column_names(dataset) -> list[str]:
    """A dataset's column names: `dataset.column_names`, else the keys of its first row."""
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    return list(dataset[0].keys()) if len(dataset) else []


def header_sizes(images, where: str, skip_bad_images: bool = False) -> list:
    """[height, width] of each of one row's images (one image or a list), read from file headers.

    An unreadable image is an `ImageInputError` naming `where` (e.g. "dataset row 12") and the image, or, with
    `skip_bad_images`, a None size (the sampler counts it as no image tokens; the collator then raises on that row,
    or skips and counts it with `skip_bad_rows`).
    """
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        images = [images]
    sizes = []
    for position, image in enumerate(images):
        try:
            sizes.append(list(image_size(image_source(image))))
        except ImageInputError as error:
            if not skip_bad_images:
                raise ImageInputError(f"{where}, image {position} of the row: {error}") from error
            logger.warning("%s, image %d of the row: %s; its size is recorded as None", where, position, error)
            sizes.append(None)
    return sizes


def image_source(image):
    """An image as `load_image` / `image_size` read it: a `datasets` image struct ({"bytes", "path"}, what an
    undecoded `datasets.Image` column holds) becomes its encoded bytes or its path; anything else is unchanged."""
    if isinstance(image, dict):
        if image.get("bytes"):
            return image["bytes"]
        if image.get("path"):
            return image["path"]
        raise ImageInputError(f"image entry {image!r:.80} has neither bytes nor a path")
    if image is None:
        raise ImageInputError("the image is missing (None)")
    return image


def keep_images_encoded(dataset: datasets.Dataset, image_column: str | None = None) -> datasets.Dataset:
    """`dataset` whose image column is not decoded when rows are read: rows hold {"bytes", "path"} structs, which
    the collator decodes. Why: `datasets` decodes images inside `dataset[indices]`, so one broken image would crash
    the DataLoader with no row named; decoded in the collator, it is an error naming the row, or skipped and counted
    with `skip_bad_rows`. Only the feature's decode flag changes (no data is copied).
    """
    import datasets

    names = dataset.column_names
    image_column = find_image_column(names, image_column)
    if image_column is None:
        return dataset
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if not isinstance(inner, datasets.Image):
        raise ValueError(f"column {image_column!r} is {feature}, not an Image or a list of Images")
    # `cast_column` to a list of undecoded images would rewrite the whole dataset (a full `cast`) though the Arrow
    # data stays the same; swap the feature on a new Dataset over the same table instead.
    features = dataset.features.copy()
    features[image_column] = type(feature)(datasets.Image(decode=False))
    info = dataset.info.copy()
    info.features = features
    return datasets.Dataset(dataset.data, info=info, split=dataset.split, indices_table=dataset._indices,
                            fingerprint=f"{dataset._fingerprint}-encoded-{image_column}")


# --- sizes for the sampler ------------------------------------------------------------------------------------


def dataset_image_sizes(dataset, image_column: str | None = None, skip_bad_images: bool = False) -> list[list]:
    """Per row, the [height, width] of each image: from the size columns when present, else from file headers."""
    names = column_names(dataset)
    if IMAGE_SIZES_COLUMN in names or {"height", "width"} <= set(names):
        image_column = find_image_column(names, image_column)
        return _sizes_from_columns(dataset, names, image_column)
    image_column = find_image_column(names, image_column)
    if image_column is None:
        raise ValueError(
            f"no 'images' or 'image' column (nor '{IMAGE_SIZES_COLUMN}' or 'height' + 'width') among {names}; "
            "pass image_column="
        )
    if _is_arrow_dataset(dataset):  # encoded bytes, read in Arrow batches: nothing is decoded
        sizes, start = [], 0
        for table in dataset.select_columns([image_column]).with_format("arrow").iter(batch_size=1000):
            for offset, images in enumerate(table.column(image_column).to_pylist()):
                sizes.append(header_sizes(images, f"dataset row {start + offset}", skip_bad_images))
            start += table.num_rows
        return sizes
    return [header_sizes(dataset[i][image_column], f"dataset row {i}", skip_bad_images) for i in range(len(dataset))]


def _sizes_from_columns(dataset, names: list[str], image_column: str | None) -> list:
    wanted = [IMAGE_SIZES_COLUMN] if IMAGE_SIZES_COLUMN in names else ["height", "width"]
    if _is_arrow_dataset(dataset):
        table = dataset.select_columns(wanted).with_format("arrow")[:]  # honours select / shuffle indices
        if image_column is not None:
            _check_image_counts(dataset, image_column, wanted)
        fast = _sizes_from_arrow(table, wanted)
        if fast is not None:
            return fast
        columns = {name: table.column(name).to_pylist() for name in wanted}
    else:
        columns = {name: [dataset[i][name] for i in range(len(dataset))] for name in wanted}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return [sizes_from_row(row, index) or () for index, row in enumerate(rows)]


def sizes_from_row(row: dict, index) -> tuple | None:
    """One row's image sizes from its `image_sizes` or `height` + `width` values (numbers, or lists for several
    images); None when it has neither."""
    if row.get(IMAGE_SIZES_COLUMN) is not None:
        return _row_sizes(row[IMAGE_SIZES_COLUMN], index)
    height, width = row.get("height"), row.get("width")
    if height is None or width is None:
        return None
    if isinstance(height, (list, tuple)) or isinstance(width, (list, tuple)):
        both_lists = isinstance(height, (list, tuple)) and isinstance(width, (list, tuple))
        if not both_lists or len(height) != len(width):
            raise ValueError(f"dataset row {index}: 'height' and 'width' must both be numbers or equal-length lists")
        return _row_sizes(list(zip(height, width)), index)
    return _row_sizes([(height, width)], index)


def _row_sizes(sizes, row: int) -> tuple:
    """One row's sizes as a tuple of (height, width) (None for an unreadable image), checked."""
    if sizes is None:
        return ()
    out = []
    for size in sizes:
        if size is None:
            out.append(None)
            continue
        if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
            raise ValueError(f"dataset row {row}: image size {size!r} is not a [height, width] pair of positive ints")
        out.append((int(size[0]), int(size[1])))
    return tuple(out)


def _sizes_from_arrow(table, wanted: list[str]) -> list | None:
    """Per-row size tuples straight from Arrow buffers, or None where the column needs the row-by-row path
    (nulls, multi-image height/width lists). Rows with equal sizes get the same tuple object, which the sampler's
    plan cache keys on: a million rows are planned in the time of their few thousand distinct sizes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if wanted == ["height", "width"]:
        height, width = (table.column(name).combine_chunks() for name in wanted)
        integers = pa.types.is_integer(height.type) and pa.types.is_integer(width.type)
        if height.null_count or width.null_count or not integers:
            return None
        pairs = np.stack([height.to_numpy(), width.to_numpy()], axis=1).astype(np.int64)
        per_row = np.ones(len(pairs), dtype=np.int64)
    else:
        column = table.column(IMAGE_SIZES_COLUMN).combine_chunks()
        if column.null_count or not pa.types.is_list(column.type):
            return None
        inner = column.flatten()
        if inner.null_count or not pa.types.is_list(inner.type) or not pa.types.is_integer(inner.type.value_type):
            return None
        if len(inner) and pc.min_max(pc.list_value_length(inner)).as_py() != {"min": 2, "max": 2}:
            return None
        values = inner.flatten()
        if values.null_count:
            return None
        pairs = values.to_numpy().astype(np.int64).reshape(-1, 2)
        per_row = pc.list_value_length(column).to_numpy().astype(np.int64)
    if len(pairs) and pairs.min() < 1:
        row = int(np.searchsorted(np.cumsum(per_row), int((pairs < 1).any(axis=1).argmax()), side="right"))
        raise ValueError(f"dataset row {row}: an image size is not positive ({wanted} column)")
    unique, inverse = np.unique((pairs[:, 0] << 32) | pairs[:, 1], return_inverse=True)  # one int64 per size
    inverse = inverse.reshape(-1)
    singles = [((int(key >> 32), int(key & 0xFFFFFFFF)),) for key in unique.tolist()]
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]]) if len(per_row) else per_row
    rows: list = [()] * len(per_row)
    single = np.nonzero(per_row == 1)[0]
    for row, u in zip(single.tolist(), inverse[starts[single]].tolist()):
        rows[row] = singles[u]
    for row in np.nonzero(per_row > 1)[0].tolist():  # multi-image rows: few, built one by one
        start = int(starts[row])
        rows[row] = tuple(singles[u][0] for u in inverse[start : start + int(per_row[row])].tolist())
    return rows


def _check_image_counts(dataset, image_column: str, size_columns: list[str]):
    """Every row has as many sizes as images: a stale size column would give the sampler wrong lengths.

    Read from the Arrow list offsets of the stored table (zero-copy, no image bytes are touched).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.data
    images = table.column(image_column)

    def counts(column):
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            return pc.fill_null(pc.list_value_length(column), 0)
        return pc.cast(pc.is_valid(column), pa.int32())  # one image (or none) per row

    have = counts(images).to_numpy()
    sizes = counts(table.column(size_columns[0])).to_numpy()
    rows = np.arange(len(have)) if dataset._indices is None else dataset._indices.column("indices").to_numpy()
    mismatch = rows[have[rows] != sizes[rows]]  # the rows of the dataset (select / shuffle map them to stored rows)
    if len(mismatch):
        row = int(mismatch[0])
        raise ValueError(
            f"the '{size_columns[0]}' column disagrees with the '{image_column}' column on {len(mismatch)} rows "
            f"(first: stored row {row}, {int(have[row])} images but {int(sizes[row])} sizes); it is stale: "
            "recompute it with add_image_sizes, or drop it to read sizes from the image headers"
        )


def dataset_text_lengths(dataset, text_length: Callable[[dict], int] | str, image_column: str | None) -> list[int]:
    """Per row, its text length: a column (by name) or `text_length(row)` on rows without their image column."""
    names = column_names(dataset)
    if isinstance(text_length, str):
        if text_length not in names:
            raise ValueError(f"text_length column {text_length!r} is not among the columns {names}")
        if _is_arrow_dataset(dataset):
            return dataset.select_columns([text_length]).with_format("arrow")[:].column(text_length).to_pylist()
        return [int(dataset[i][text_length]) for i in range(len(dataset))]
    if _is_arrow_dataset(dataset):
        drop = [name for name in IMAGE_COLUMNS + (image_column,) if name in names]
        lengths = []
        for batch in dataset.remove_columns(sorted(set(drop))).iter(batch_size=1000):
            positions = range(len(lengths), len(lengths) + len(next(iter(batch.values()), [])))
            lengths += _text_lengths_of_batch(batch, positions, text_length)[TEXT_LENGTH_COLUMN]
        return lengths
    lengths = []
    for index in range(len(dataset)):
        row = dict(dataset[index])
        for name in IMAGE_COLUMNS + (image_column,):
            row.pop(name, None)
        row.setdefault(INDEX_KEY, index)  # so that errors name the row
        lengths.append(int(text_length(row)))
    return lengths


def _is_arrow_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)


# --- adding the columns once, cached by datasets -----------------------------------------------------------------


def _sizes_of_batch(images, row_names, skip_bad_images):
    """`row_names`: the batch's `__index__` values (an Arrow array) or positions (from `with_indices`)."""
    row_names = row_names.to_pylist() if hasattr(row_names, "to_pylist") else row_names
    return {IMAGE_SIZES_COLUMN: [header_sizes(row, f"dataset row {name}", skip_bad_images)
                                 for row, name in zip(images.to_pylist(), row_names)]}


def add_image_sizes(dataset: datasets.Dataset, num_proc: int | None = None, image_column: str | None = None,
                    skip_bad_images: bool = False, batch_size: int = 1000) -> datasets.Dataset:
    """`dataset` with an `image_sizes` column: per row, [height, width] of each image, read from file headers.

    One `datasets.Dataset.map(num_proc=...)` over the image column in Arrow form (no image is decoded; JPEG, PNG,
    WebP headers are read), writing only the new column; `map`'s fingerprint caches it, so on a dataset loaded from
    files the second call reads the cache. The sampler (`BucketBatchSampler.from_dataset`, `NanoVLMTrainer`) then
    reads sizes from this column instead of opening every image. An unreadable image is an error naming its row
    (its `__index__` when the dataset has that column, else its position), or with `skip_bad_images` a None size
    (see `header_sizes`).
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"add_image_sizes takes a datasets.Dataset, got {type(dataset).__name__}")
    names = dataset.column_names
    image_column = find_image_column(names, image_column)
    if image_column is None:
        raise ValueError(f"no 'images' or 'image' column among {names}; pass image_column=")
    if IMAGE_SIZES_COLUMN in names:
        dataset = dataset.remove_columns([IMAGE_SIZES_COLUMN])
    has_index = INDEX_KEY in names  # errors name a row by its __index__, else by its position
    read = [image_column, INDEX_KEY] if has_index else [image_column]
    sizes = dataset.select_columns(read).with_format("arrow").map(
        _sizes_of_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=not has_index,
        input_columns=read,
        remove_columns=read,
        fn_kwargs={"skip_bad_images": skip_bad_images},
        features=datasets.Features({IMAGE_SIZES_COLUMN: datasets.List(datasets.List(datasets.Value("int32")))}),
        num_proc=num_proc,
        desc="Reading image sizes from headers",
    )
    return _join_columns(dataset, sizes.with_format(None))


def _text_lengths_of_batch(batch, positions=None, text_length=None):
    keys = list(batch)
    count = len(batch[keys[0]]) if keys else 0
    rows = [{key: batch[key][i] for key in keys} for i in range(count)]
    if positions is not None:  # so that errors name the row
        for row, position in zip(rows, positions):
            row.setdefault(INDEX_KEY, position)
    return {TEXT_LENGTH_COLUMN: [int(text_length(row)) for row in rows]}


def add_text_lengths(dataset: datasets.Dataset, text_length: Callable[[dict], int], num_proc: int | None = None,
                     image_column: str | None = None, batch_size: int = 1000) -> datasets.Dataset:
    """`dataset` with a `text_length` column: `text_length(row)` (e.g. `NanoVLMCollator(processor).text_length`)
    of every row, computed on the rows without their image column (nothing is decoded), cached by `map`. Rows
    without an `__index__` get their position there, so the collator's errors name the row."""
    import datasets

    names = dataset.column_names
    image_columns = sorted({name for name in IMAGE_COLUMNS + (image_column,) if name in names})
    text_columns = [name for name in names if name not in image_columns + [TEXT_LENGTH_COLUMN, IMAGE_SIZES_COLUMN]]
    if TEXT_LENGTH_COLUMN in names:
        dataset = dataset.remove_columns([TEXT_LENGTH_COLUMN])
    lengths = dataset.select_columns(text_columns).map(
        _text_lengths_of_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=INDEX_KEY not in text_columns,
        remove_columns=text_columns,
        fn_kwargs={"text_length": text_length},
        features=datasets.Features({TEXT_LENGTH_COLUMN: datasets.Value("int32")}),
        num_proc=num_proc,
        desc="Counting text tokens",
    )
    return _join_columns(dataset, lengths)


def _join_columns(dataset, new):
    """`dataset` with the columns of `new` (the same rows, in the same order) added, without copying `dataset`.

    After select / shuffle / train_test_split, a dataset's rows are an indices mapping over its stored table, and
    joining columns to it would rewrite every row, images included (`flatten_indices`). The new columns are
    scattered into stored order instead (stored rows outside the mapping get nulls) and the mapping is kept.
    """
    import datasets
    import numpy as np
    import pyarrow as pa

    if dataset._indices is None:
        return datasets.concatenate_datasets([dataset, new], axis=1)
    indices = dataset._indices.column("indices").to_numpy()
    position = np.full(len(dataset.data), -1, dtype=np.int64)
    position[indices] = np.arange(len(indices))
    scattered = new.data.table.take(pa.array(position, mask=position < 0))
    stored = datasets.Dataset(dataset.data, info=dataset.info.copy(), split=dataset.split,
                              fingerprint=f"{dataset._fingerprint}-stored")
    extra = datasets.Dataset(datasets.table.InMemoryTable(scattered), info=new.info.copy(),
                             fingerprint=f"{new._fingerprint}-scattered")
    return datasets.concatenate_datasets([stored, extra], axis=1).select(indices)


__all__ = ["add_image_sizes", "add_text_lengths", "keep_images_encoded", "image_source", "dataset_image_sizes",
           "dataset_text_lengths",
           "IMAGE_SIZES_COLUMN", "TEXT_LENGTH_COLUMN"]
