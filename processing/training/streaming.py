"""Buffered bucketing for streamed datasets: batches of similar image shape and length from a window of the stream.

`BucketBatchSampler` sees the whole dataset; a `datasets.IterableDataset` (`load_dataset(..., streaming=True)`, or
`Dataset.to_iterable_dataset(num_shards=...)`) can only be read in order. `StreamingBucketBatches` reads it through
a buffer of `buffer_size` rows and cuts batches inside the buffer with the sampler's own rules: rows are grouped by
`bucket_key` of their planned images (the exact shape when the image processor snaps), sorted by total length (text
tokens + image tokens from the plan, rounded up to `length_step`), and cut into `batch_size` rows or greedily up to
`max_tokens_per_batch` padded tokens. How an epoch goes (deterministic from (seed, epoch, rank)):

  1. the process's rows: `datasets.distributed.split_dataset_by_node(dataset, rank, world_size)` (whole shards per
     process when the shard count divides evenly, else every `world_size`-th row), shard order shuffled per epoch;
  2. rows are read into the buffer; only image *sizes* are read -- from `image_sizes` or `height`/`width` columns
     when present, else from the encoded image's header (decoding is switched off while batching, so the buffer
     holds encoded bytes, not pixels);
  3. when the buffer is full, every full batch it holds is cut (full: `batch_size` rows, or a token-budget batch
     that another row of its bucket would overflow); the rest of each bucket stays in the buffer for the rows still
     to come; the cut batches are handed out in random order. If no bucket holds a full batch (a buffer too small
     for the number of buckets), one batch is cut around the fullest bucket, topped up from its neighbours. At the
     end of the epoch the remainder is cut too (per bucket, then the leftovers of all buckets pooled into mixed
     batches, as the sampler does);
  4. every row carries `__index__`: its position in this process's stream for the epoch.

Every row of the process's shard is in exactly one batch per epoch. The number of batches is not known in advance
(it depends on what the buffer held), so the stream has no length: train with `max_steps`.

Resuming: `state_dict()` / `load_state_dict()` record (seed, epoch, batches handed out); the next iteration re-reads
the stream from the start of that epoch and skips the batches already handed out -- rows are read and grouped
again (headers only, nothing is decoded or collated), so the remaining batches are exactly those of the
uninterrupted run. `NanoVLMTrainer` resumes this way from a checkpoint's step count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
from torch.utils.data import IterableDataset

from ..image_loading import image_size
from .sampler import (
    ASPECT_RATIO_EDGES,
    SIZE_BUCKETS,
    _chunks,
    check_batch_limits,
    image_bucket,
    pack_by_tokens,
    round_up,
    snaps_to_buckets,
)
from .sizes import IMAGE_COLUMNS, INDEX_KEY, image_source, sizes_from_row


@dataclass
class _Entry:
    """One buffered row and what batching needs to know about it."""

    row: dict
    length: int  # text + image tokens, exact
    rounded_length: int
    key: tuple  # the buckets of its images
    shape: tuple  # the resized shapes of its images
    tie_break: float


def _check_stream(dataset) -> None:
    """A `datasets.IterableDataset`, or a TypeError that says how to get one."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        raise TypeError(
            "StreamingBucketBatches reads a datasets.IterableDataset; this is a map-style datasets.Dataset. "
            "Bucket it whole with BucketBatchSampler (NanoVLMTrainer does), or stream it with "
            "dataset.to_iterable_dataset(num_shards=...)"
        )
    if not isinstance(dataset, datasets.IterableDataset):
        raise TypeError(
            f"StreamingBucketBatches reads a datasets.IterableDataset (load_dataset(..., streaming=True) or "
            f"Dataset.to_iterable_dataset()), got {type(dataset).__name__}"
        )


class StreamingBucketBatches(IterableDataset):
    r"""Batches (lists of rows) from a streamed dataset, bucketed by image shape and length inside a shuffle buffer.

    Args:
        dataset: a `datasets.IterableDataset` (a map-style `datasets.Dataset` must be converted first with
            `to_iterable_dataset(num_shards=...)`; use `BucketBatchSampler` for it otherwise).
        image_processor: the `NanoVLMImageProcessor` whose plan gives each image's token count and shape.
        text_length: a function of a row giving its text tokens, image tokens excluded (e.g.
            `NanoVLMCollator(processor).text_length`), or the name of a column holding them.
        batch_size: rows per batch; with `max_tokens_per_batch` it only caps the rows.
        max_tokens_per_batch: variable batch size: rows x longest row (text + image tokens) stays within it.
        buffer_size: rows read ahead and grouped; larger gives fuller, more uniform batches and more mixing, at
            the memory of that many encoded rows. Must be at least `batch_size`.
        seed, shuffle: the order is a function of (seed, epoch, rank); `shuffle=False` keeps the stream's order
            inside each bucket and hands batches out in the order they are cut.
        rank, world_size: this process's place among the data-parallel processes; each reads its own rows.
        size_buckets, aspect_ratio_edges, length_step, plan_overrides: as in `BucketBatchSampler`.
        image_column: the image column; by default "images" or "image", whichever a row has.
        repeat: iterate epoch after epoch without end (what `NanoVLMTrainer` uses, so that a resumed run continues
            across epoch boundaries exactly); by default one pass is one epoch, and `set_epoch` picks it.

    Rows come out with their images as the dataset gives them, except `datasets` image structs, which come out as
    their encoded bytes (or path) for the collator to decode.
    """

    def __init__(
        self,
        dataset,
        image_processor,
        text_length: Callable[[dict], int] | str,
        batch_size: int | None = None,
        max_tokens_per_batch: int | None = None,
        buffer_size: int = 1024,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        size_buckets: Sequence[int] = SIZE_BUCKETS,
        aspect_ratio_edges: Sequence[float] = ASPECT_RATIO_EDGES,
        length_step: int = 16,
        plan_overrides: dict | None = None,
        image_column: str | None = None,
        repeat: bool = False,
    ):
        from datasets.distributed import split_dataset_by_node

        _check_stream(dataset)
        check_batch_limits(batch_size, max_tokens_per_batch)
        if buffer_size < 1 or (batch_size is not None and buffer_size < batch_size):
            raise ValueError(
                f"buffer_size={buffer_size} cannot hold one batch of batch_size={batch_size}; "
                "the buffer must be at least one batch (better: many, so batches can be grouped)"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if length_step < 1:
            raise ValueError(f"length_step must be >= 1, got {length_step}")

        if dataset.features is not None:  # batch on encoded images: sizes come from headers, the buffer stays small
            dataset = dataset.decode(False)
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.image_processor = image_processor
        self.text_length = text_length
        self.rows_per_batch = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.buffer_size = buffer_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.size_buckets = tuple(size_buckets)
        self.aspect_ratio_edges = tuple(aspect_ratio_edges)
        self.length_step = length_step
        self.plan_overrides = dict(plan_overrides or {})
        self.snapping = snaps_to_buckets(image_processor, self.plan_overrides)
        self.image_column = image_column
        self.repeat = repeat
        self.epoch = 0
        self._skip = 0  # batches to skip on the next iteration (load_state_dict)
        self._yielded = 0  # batches of the current epoch handed out so far

    # --- torch IterableDataset protocol, epochs, resuming ------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass buckets (its own shuffle); a resume point of another epoch is dropped."""
        if epoch != self.epoch:  # a resume point only holds for its own epoch
            self._skip = self._yielded = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[dict]]:
        _refuse_worker_processes()
        skip, self._skip = self._skip, 0
        while True:
            self._yielded = 0
            yielded_any = False
            for batch in self.batches(self.epoch):
                yielded_any = True
                self._yielded += 1
                if skip:  # resuming: cut, not handed out (and never collated)
                    skip -= 1
                    continue
                yield batch
            if not self.repeat:
                return
            if not yielded_any:
                raise ValueError(f"process {self.rank} of {self.world_size} has no rows to train on")
            self.epoch += 1

    def state_dict(self) -> dict:
        """Where the stream stands: the epoch and the batches of it handed out so far (by this process)."""
        return {"seed": self.seed, "epoch": self.epoch, "num_batches_yielded": self._yielded,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues `state`'s epoch after the batches it had handed out (with `repeat`, the
        count may run past the end of that epoch into the next ones)."""
        for name in ("seed", "rank", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"the state was saved with {name}={state[name]}, this stream has {getattr(self, name)}"
                )
        self.epoch = state["epoch"]
        self._skip = self._yielded = state["num_batches_yielded"]

    # --- one epoch ---------------------------------------------------------------------------------------------

    def batches(self, epoch: int) -> Iterator[list[dict]]:
        """The batches of `epoch` on this process, in order (a generator: reads the stream as it goes)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        stream = self.dataset
        if self.shuffle:
            # Shard order only (a buffer of 1 row): the shuffle of rows is the bucketing buffer's own.
            stream = stream.shuffle(seed=self.seed, buffer_size=1)
            stream.set_epoch(epoch)
        buffer: list[_Entry] = []
        for index, row in enumerate(stream):
            buffer.append(self.measure(dict(row), index, rng))
            if len(buffer) >= self.buffer_size:
                cut, buffer = self._cut(buffer, final=False)
                if not cut:  # no bucket holds a full batch (more buckets than this buffer fills): make room
                    cut, buffer = self._cut_one(buffer)
                yield from self._hand_out(cut, rng)
        if buffer:
            cut, _ = self._cut(buffer, final=True)
            yield from self._hand_out(cut, rng)

    def measure(self, row: dict, index: int, rng: np.random.Generator) -> _Entry:
        """Plan the row's images from their sizes (no pixels) and count its tokens."""
        column = self._image_column(row)
        sizes = self._image_sizes(row, column, index)
        try:  # planned together: under a per-sample budget the row's images share it
            plans = self.image_processor.plan_sample(sizes, **self.plan_overrides)
        except ValueError as error:
            raise ValueError(f"dataset row {index}: {error}") from error
        if column is not None:
            row[column] = _decodable(row[column])
        text_row = {name: value for name, value in row.items() if name != column}
        text = int(row[self.text_length]) if isinstance(self.text_length, str) else int(self.text_length(text_row))
        length = text + sum(plan.num_tokens for plan in plans)
        if self.max_tokens_per_batch is not None and length > self.max_tokens_per_batch:
            raise ValueError(
                f"dataset row {index}: needs {length} tokens ({text} text + {length - text} image), more than "
                f"max_tokens_per_batch={self.max_tokens_per_batch}"
            )
        row[INDEX_KEY] = index
        keys = [image_bucket(plan, self.snapping, self.size_buckets, self.aspect_ratio_edges) for plan in plans]
        return _Entry(
            row=row,
            length=length,
            rounded_length=round_up(length, self.length_step),
            key=tuple(sorted(keys)),
            shape=tuple(sorted((plan.resized_height, plan.resized_width) for plan in plans)),
            tie_break=float(rng.random()) if self.shuffle else float(index),
        )

    def _image_column(self, row: dict) -> str | None:
        if self.image_column is not None:
            if self.image_column not in row:
                raise ValueError(f"image_column {self.image_column!r} is not among the row's keys {sorted(row)}")
            return self.image_column
        return next((name for name in IMAGE_COLUMNS if row.get(name) is not None), None)

    @staticmethod
    def _image_sizes(row: dict, column: str | None, index: int) -> list[tuple[int, int]]:
        """(height, width) of each image: from `image_sizes` or `height`/`width` columns, else image headers."""
        images = [] if column is None else row[column]
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        sizes = sizes_from_row(row, index)
        if sizes is None:
            return [image_size(image_source(image)) for image in images]
        if len(sizes) != len(images):
            raise ValueError(
                f"dataset row {index}: {len(images)} images but sizes for {len(sizes)} in its size columns"
            )
        return sizes

    def _cut(self, buffer: list[_Entry], final: bool) -> tuple[list[list[_Entry]], list[_Entry]]:
        """(batches, rows kept): full batches per bucket; with `final`, the rest too (leftovers pooled)."""
        by_bucket = defaultdict(list)
        for entry in buffer:
            by_bucket[entry.key].append(entry)
        batches, kept = [], []
        for key in sorted(by_bucket):
            members = sorted(by_bucket[key], key=lambda e: (-e.rounded_length, e.shape, e.tie_break))
            if self.max_tokens_per_batch is not None:
                packed = pack_by_tokens(
                    members, attrgetter("rounded_length"), self.max_tokens_per_batch, self.rows_per_batch
                )
                if not final:  # the last (shortest) batch of a bucket may still fill up with rows to come
                    kept += packed.pop()
                batches += packed
            else:
                full = len(members) - len(members) % self.rows_per_batch
                batches += _chunks(members[:full], self.rows_per_batch)
                kept += members[full:]  # bucket by bucket, still sorted: neighbours stay similar
        if final and kept and self.max_tokens_per_batch is None:
            batches += _chunks(kept, self.rows_per_batch)
            kept = []
        return batches, kept

    def _cut_one(self, buffer: list[_Entry]) -> tuple[list[list[_Entry]], list[_Entry]]:
        """One batch around the fullest bucket, topped up from its neighbours (in bucket order), the rest kept."""
        order = sorted(buffer, key=lambda e: (e.key, -e.rounded_length, e.shape, e.tie_break))
        sizes = defaultdict(int)
        for entry in order:
            sizes[entry.key] += 1
        fullest = max(sorted(sizes), key=lambda key: sizes[key])
        start = next(position for position, entry in enumerate(order) if entry.key == fullest)
        if self.max_tokens_per_batch is not None:  # the fullest bucket is one batch under the budget already
            return [order[start : start + sizes[fullest]]], order[:start] + order[start + sizes[fullest]:]
        start = min(start, len(order) - self.rows_per_batch)
        return [order[start : start + self.rows_per_batch]], order[:start] + order[start + self.rows_per_batch :]

    def _hand_out(self, batches: list[list[_Entry]], rng: np.random.Generator) -> Iterator[list[dict]]:
        order = rng.permutation(len(batches)) if self.shuffle else range(len(batches))
        for position in order:
            yield [entry.row for entry in batches[position]]


def _decodable(images):
    """`datasets` image structs ({"bytes", "path"}) as what `load_image` reads; anything else as it is."""
    if isinstance(images, (list, tuple)):
        return [_decodable(image) for image in images]
    if isinstance(images, dict) and ("bytes" in images or "path" in images):
        return image_source(images)
    return images


def _refuse_worker_processes():
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        raise ValueError(
            "StreamingBucketBatches cannot run in DataLoader worker processes: every worker would read and hand out "
            "the same batches. Use dataloader_num_workers=0 (the collator still decodes images in the main process), "
            "or split the stream yourself"
        )


__all__ = ["StreamingBucketBatches"]
