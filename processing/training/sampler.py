"""BucketBatchSampler: batches of similar image shape and sequence length, exact under accelerate's sharding.

Every sample's sequence length (text tokens + image tokens) and image buckets come from the image processor's
plan, computed from (height, width) alone, so building the sampler never decodes an image.

How an epoch is batched (deterministic from (seed, epoch)):
  1. samples are grouped by bucket: for each image, (resized long side bucket, aspect-ratio range) -- see
     `bucket_key` -- or its exact shape when the image processor snaps images to bucket resolutions; a sample
     with several images is keyed by all of them;
  2. inside a bucket, samples are sorted by length rounded up to `length_step`, then by exact image shape, and
     samples that tie are ordered at random for this epoch -- so batches change from epoch to epoch while their
     lengths, and hence the number of batches, do not;
  3. batches are cut from each bucket: `batch_size` rows each (the rows left over in every bucket are pooled into
     mixed batches, so every batch but one is full), or greedily up to `max_tokens_per_batch` padded tokens;
  4. with `num_replicas` > 1 the largest batches are halved until the count is a multiple of `num_replicas`;
  5. the batch order is shuffled (the one short fixed-size batch, if any, goes last);
  6. with `budgets`, every batch draws its image-token budget (`max_image_tokens`) -- see "Budget-robust training".

Budget-robust training (`budgets=[144, 64, 36, 16]`, or any sequence of ints such as `range(16, 145, 8)`): each
batch of an epoch gets one budget, drawn from (seed, epoch, batch position) and balanced (over an epoch every budget
goes to the same number of batches, give or take one), so one model learns every shuffle factor's projection and
the pooled path. Batches are cut exactly as without budgets, from each sample's length at its largest budget: a
sample's image tokens never grow when the budget shrinks, so `max_tokens_per_batch` holds at every drawn budget,
and the number of batches, the sharding and resuming are unchanged. The exact length of every sample at every
budget is known (`lengths_at`). The drawn budget travels with each index: the sampler then yields
`PlannedIndex(index, plan)` keys, and `PlannedRows(dataset)` (processing/training/rows.py) turns a key into the row with
`"__plan__": {"max_image_tokens": budget}`, which `NanoVLMCollator` passes to the processor call. With
`budget_setting="max_image_tokens_per_sample"` the drawn budgets are per-sample budgets instead, shared by the images
of each sample (see `plan_images`); a sample's tokens never grow when that budget shrinks either.

A sample with several images is planned as one (`image_processor.plan_sample`): under a per-sample budget
(`max_image_tokens_per_sample`, set on the processor, in `plan_overrides` or drawn) its images share it.

Data whose image sizes change between epochs (new random layouts each epoch, as in the built-in digits task):
`sampler.replan(image_sizes)`, or `sizes_for_epoch=` so that `set_epoch` re-plans by itself, plans the same samples
again from the new sizes, keeping the epoch, a resume point and the number of batches.

Why the number of batches must not change between epochs: the Trainer reads `len(dataloader)` once and plans
every epoch's optimizer steps from it. That is why step 2 sorts whole buckets (by rounded length, random among
ties) instead of sorting random megabatches, whose packing would give a different count each epoch.

Sharding (accelerate's `BatchSamplerShard`, `split_batches=False`): process r gets batches r, r + N, r + 2N, ...
A fixed batch size is only exposed (`self.batch_size`) when it holds for every batch but the last and there is one
process. Otherwise `batch_size` is None: accelerate then deals batches round-robin without checking sizes, and
because the count is a multiple of N, every process gets the same number of batches and every sample is seen
exactly once per epoch -- with `even_batches` True or False. With `num_replicas` left at 1 on N > 1 processes,
accelerate would instead repeat a few samples from the start of the epoch to even out the last round.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

from ..image_processing_nanovlm import ImagePlan

# The plan settings a sampler's budgets may draw (`budget_setting`).
BUDGET_SETTINGS = ("max_image_tokens", "max_image_tokens_per_sample")
# Resized long side, upper edges of the size buckets (anything larger falls in one more bucket).
SIZE_BUCKETS = (512, 768, 1024, 1536)
# Width / height, edges of the aspect-ratio ranges: tall, portrait, square-ish, landscape, wide.
ASPECT_RATIO_EDGES = (0.5, 0.8, 1.25, 2.0)


def bucket_key(
    plan: ImagePlan,
    size_buckets: Sequence[int] = SIZE_BUCKETS,
    aspect_ratio_edges: Sequence[float] = ASPECT_RATIO_EDGES,
) -> tuple[int, int]:
    """(size bucket, aspect-ratio range) of one planned image: where the sampler's buckets are defined.

    Both are indices: the size bucket counts the `size_buckets` edges below the resized long side, the aspect
    range counts the `aspect_ratio_edges` below width / height. When the image processor snaps images to bucket
    resolutions (`snap_sizes`), the sampler uses the exact snapped shape instead: the processor owns that grid.
    """
    long_side = max(plan.resized_height, plan.resized_width)
    aspect = plan.resized_width / plan.resized_height
    return bisect.bisect_left(size_buckets, long_side), bisect.bisect_left(aspect_ratio_edges, aspect)


class PlannedIndex(NamedTuple):
    """A dataset index and the plan overrides its batch was drawn with (`{"max_image_tokens": 64}`).

    What a `BucketBatchSampler` with `budgets` yields instead of plain ints; `PlannedRows` reads it.
    """

    index: int
    plan: dict


def snaps_to_buckets(image_processor, plan_overrides: dict) -> bool:
    """Whether plans snap images to bucket resolutions (`snap_sizes`, set on the processor or for this call)."""
    return bool(plan_overrides.get("snap_sizes") or getattr(image_processor, "snap_sizes", None))


def image_bucket(
    plan: ImagePlan, snapping: bool, size_buckets: Sequence[int], aspect_ratio_edges: Sequence[float]
) -> tuple[int, int]:
    """The bucket of one planned image: its exact shape when images snap to bucket resolutions (the processor
    owns that grid), else `bucket_key`."""
    if snapping:
        return plan.resized_height, plan.resized_width
    return bucket_key(plan, size_buckets, aspect_ratio_edges)


def check_batch_limits(batch_size: int | None, max_tokens_per_batch: int | None):
    if batch_size is None and max_tokens_per_batch is None:
        raise ValueError("give batch_size, max_tokens_per_batch, or both")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")


def round_up(length: int, step: int) -> int:
    return -(-length // step) * step


def _as_image_list(sizes) -> list[tuple[int, int]]:
    """One sample's image sizes as a list of (height, width): accepts one pair, a list of pairs, or None."""
    if sizes is None:
        return []
    if len(sizes) == 2 and all(isinstance(side, (int, np.integer)) for side in sizes):
        return [(int(sizes[0]), int(sizes[1]))]
    # None: an image whose header could not be read (`skip_bad_images`): no tokens; the collator deals with the row
    return [(int(height), int(width)) for height, width in (size for size in sizes if size is not None)]


class BucketBatchSampler(Sampler[list[int]]):
    r"""Batch sampler (yields lists of dataset indices) grouping samples by image bucket and sequence length.

    Args:
        image_sizes: per sample, the (height, width) of its image, a list of them, or None / [] for no image.
        text_lengths: per sample, the number of text tokens (image tokens excluded, see
            `NanoVLMCollator.text_length`).
        image_processor: the `NanoVLMImageProcessor` whose plan gives each image's token count and shape.
        batch_size: rows per batch; with `max_tokens_per_batch` it only caps the rows.
        max_tokens_per_batch: variable batch size: rows x longest row (text + image tokens, i.e. the padded LM
            batch) stays within this budget.
        num_replicas: number of data-parallel processes; the batch count is made a multiple of it.
        seed, shuffle: the epoch's order is a function of (seed, epoch) only; `shuffle=False` gives a fixed order.
        size_buckets, aspect_ratio_edges: bucket edges, see `bucket_key`.
        length_step: lengths are rounded up to a multiple of this before sorting; larger gives more varied batches
            at the cost of up to `length_step - 1` padding tokens per row.
        plan_overrides: plan settings used at batching time (e.g. `{"max_image_tokens": 256}`), the same ones
            the collator's processor call uses.
        budgets: image-token budgets (`max_image_tokens` values, e.g. `[144, 64, 36, 16]` or `range(16, 145, 8)`)
            that batches draw from, one per batch, for budget-robust training (see the module docstring). The
            sampler then yields `PlannedIndex(index, {"max_image_tokens": budget})` keys: wrap the dataset in
            `PlannedRows` so rows carry the budget to the collator (`NanoVLMTrainer` does this itself). Repeat
            a budget to draw it more often (`[144, 64, 36, 36, 16]`).
        budget_setting: the plan setting the drawn budgets set: "max_image_tokens" (per image, the default) or
            "max_image_tokens_per_sample" (one budget shared by each sample's images, e.g. `[288, 144, 64]`).
        sizes_for_epoch: for data whose image sizes change between epochs (new random layouts each epoch): a
            function epoch -> that epoch's image sizes (like `image_sizes`, which must be epoch 0's). `set_epoch`
            and `load_state_dict` then `replan` from it; the function is where the dataset moves to that epoch,
            so the rows it serves match the plan. Without it, call `replan` yourself.

    `len(sampler)` is the same for every epoch. Resume mid-epoch with `state_dict()` / `load_state_dict()`, or
    through accelerate's `skip_first_batches` (the Trainer's way): both give the remaining batches unchanged.
    """

    def __init__(
        self,
        image_sizes: Sequence,
        text_lengths: Sequence[int],
        image_processor,
        batch_size: int | None = None,
        max_tokens_per_batch: int | None = None,
        num_replicas: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        size_buckets: Sequence[int] = SIZE_BUCKETS,
        aspect_ratio_edges: Sequence[float] = ASPECT_RATIO_EDGES,
        length_step: int = 16,
        plan_overrides: dict | None = None,
        budgets: Sequence[int] | None = None,
        budget_setting: str = "max_image_tokens",
        sizes_for_epoch: Callable[[int], Sequence] | None = None,
    ):
        check_batch_limits(batch_size, max_tokens_per_batch)
        if num_replicas < 1 or length_step < 1:
            raise ValueError(f"num_replicas and length_step must be >= 1, got {num_replicas} and {length_step}")
        if len(text_lengths) < num_replicas:
            raise ValueError(f"{len(text_lengths)} samples cannot give every one of {num_replicas} processes a batch")

        self.image_processor = image_processor
        self._plans, self._rows = {}, {}  # plan caches, by image size and by a sample's image sizes
        self.plan_overrides = dict(plan_overrides or {})
        if budget_setting not in BUDGET_SETTINGS:
            raise ValueError(f"budget_setting must be one of {BUDGET_SETTINGS}, got {budget_setting!r}")
        self.budget_setting = budget_setting
        self.budgets = _check_budgets(budgets, self.plan_overrides, budget_setting)
        for budget in sorted(set(self.budgets or ())):  # a budget the processor cannot plan fails here, not later
            try:
                self.plan(64, 64, budget)
            except ValueError as error:
                raise ValueError(f"budget {budget}: {error}") from error
        self.snapping = snaps_to_buckets(image_processor, self.plan_overrides)
        self.size_buckets = tuple(size_buckets)
        self.aspect_ratio_edges = tuple(aspect_ratio_edges)
        self.rows_per_batch = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.num_replicas = num_replicas
        self.seed = seed
        self.shuffle = shuffle
        self.length_step = length_step
        # What accelerate's BatchSamplerShard reads: an int only when every batch but the last has exactly that
        # many rows and no halving for replicas happens; None means "variable size" (see the module docstring).
        self.batch_size = batch_size if max_tokens_per_batch is None and num_replicas == 1 else None
        self.sizes_for_epoch = sizes_for_epoch

        self.epoch = 0
        self._planned_epoch = 0  # the epoch whose sizes are planned (`sizes_for_epoch`)
        self._skip = 0  # batches to skip on the next __iter__ (set by load_state_dict)
        self._yielded = 0  # batches of the current epoch handed out so far
        self._plan_samples(image_sizes, text_lengths)
        self.num_batches = len(self.batches(0))

    def replan(self, image_sizes: Sequence, text_lengths: Sequence[int] | None = None) -> None:
        """Plan the same samples again from new image sizes (and text lengths; by default the current ones).

        For datasets whose image sizes change between epochs, e.g. new random layouts each epoch (the built-in
        digits task): buckets and lengths are planned from the new sizes, still without decoding an image. The
        epoch, the seed and a resume point (`load_state_dict`) are kept, and so is `len(sampler)`: the Trainer
        plans every epoch's steps from it, so a re-plan that would change the number of batches (possible with
        `max_tokens_per_batch`) is a `ValueError` and leaves the sampler as it was. With a fixed `batch_size` the
        count never changes. `sizes_for_epoch` calls this from `set_epoch`.
        """
        if len(image_sizes) != len(self.lengths):
            raise ValueError(f"re-planning needs the sizes of all {len(self.lengths)} samples, got {len(image_sizes)}")
        before = dict(self.__dict__)
        try:
            self._plan_samples(image_sizes, self._text_lengths if text_lengths is None else text_lengths)
            count = len(self.batches(self.epoch))
            if count != self.num_batches:
                raise ValueError(
                    f"re-planning would change the number of batches per epoch from {self.num_batches} to {count}; "
                    "the Trainer plans every epoch's steps from len(sampler): use a fixed batch_size without "
                    "max_tokens_per_batch for data whose sizes change between epochs"
                )
        except Exception:
            self.__dict__.update(before)  # a failed re-plan leaves the sampler as it was
            raise

    def _plan_samples(self, image_sizes: Sequence, text_lengths: Sequence[int]) -> None:
        """Every sample's length, bucket and resized shapes from its image sizes and text length."""
        if len(image_sizes) != len(text_lengths):
            raise ValueError(f"got {len(image_sizes)} image size entries but {len(text_lengths)} text lengths")
        # Batches are cut at the largest budget: image tokens never grow when the budget shrinks, so these lengths
        # bound the lengths at every drawn budget (`lengths_at` gives the exact ones).
        batching_budget = max(self.budgets) if self.budgets else None
        self.lengths, self.keys, self.shapes = [], [], []
        for index, (sizes, text_length) in enumerate(zip(image_sizes, text_lengths)):
            try:
                image_tokens, key, shapes = self._plan_row(sizes, batching_budget)
                shared = self.budgets and self.budget_setting == "max_image_tokens_per_sample"
                if shared and len(_as_image_list(sizes)) > 1:  # the smallest draw must fit the sample's images too
                    self._plan_row(sizes, min(self.budgets))
            except ValueError as error:
                raise ValueError(f"sample {index}: {error}") from error
            length = int(text_length) + image_tokens
            if self.max_tokens_per_batch is not None and length > self.max_tokens_per_batch:
                raise ValueError(
                    f"sample {index} needs {length} tokens ({text_length} text + {image_tokens} image), "
                    f"more than max_tokens_per_batch={self.max_tokens_per_batch}"
                )
            self.lengths.append(length)
            self.keys.append(key)
            self.shapes.append(shapes)
        self._image_sizes = image_sizes if self.budgets else None  # for `lengths_at`
        self._text_lengths = text_lengths
        self._lengths_at = {}  # budget -> exact lengths, computed when asked for
        self.rounded_lengths = [round_up(length, self.length_step) for length in self.lengths]
        # numpy views of the sort keys of `batches` (shapes by rank): sorting millions of rows with a Python key
        # function takes tens of seconds
        self._sort_lengths = -np.asarray(self.rounded_lengths, dtype=np.int64)
        shape_rank = {shape: rank for rank, shape in enumerate(sorted(set(self.shapes)))}
        self._sort_shapes = np.asarray([shape_rank[shape] for shape in self.shapes], dtype=np.int64)
        self._cached = (None, None)  # (epoch, batches)

    # --- plan and buckets: read from the image processor, never re-derived -------------------------------

    def plan(self, height: int, width: int, budget: int | None = None) -> ImagePlan:
        """The image's plan, as a sample of its own, under the sampler's `plan_overrides`, at `budget` (the
        `budget_setting`) when given.

        Cached by (size, budget): datasets of millions of rows have far fewer distinct sizes, and planning is pure
        Python."""
        key = (height, width, budget)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.image_processor.plan(height, width, **self._overrides(budget))
        return plan

    def _overrides(self, budget: int | None) -> dict:
        return self.plan_overrides if budget is None else {**self.plan_overrides, self.budget_setting: budget}

    def _shares_budget(self, budget: int | None) -> bool:
        """Whether a sample's images share a per-sample budget (then they are planned together, not one by one)."""
        overrides = self._overrides(budget)
        return (overrides.get("max_image_tokens_per_sample")
                or getattr(self.image_processor, "max_image_tokens_per_sample", None)) is not None

    def _plan_row(self, sizes, budget: int | None = None) -> tuple[int, tuple, tuple]:
        """(image tokens, bucket key, resized shapes) of one sample's image sizes, cached for hashable sizes
        (`from_dataset` hands rows with equal sizes the same tuple: a large dataset has few distinct ones)."""
        try:
            return self._rows[sizes, budget]
        except (KeyError, TypeError):  # not seen yet, or a list (unhashable)
            pass
        images = _as_image_list(sizes)
        if len(images) > 1 and self._shares_budget(budget):
            plans = self.image_processor.plan_sample(images, **self._overrides(budget))
        else:
            plans = [self.plan(height, width, budget) for height, width in images]
        planned = (
            sum(plan.num_tokens for plan in plans),
            tuple(sorted(self.bucket_of(plan) for plan in plans)),
            tuple(sorted((plan.resized_height, plan.resized_width) for plan in plans)),
        )
        if isinstance(sizes, tuple):
            try:
                self._rows[sizes, budget] = planned
            except TypeError:
                pass
        return planned

    def lengths_at(self, budget: int | None) -> list[int]:
        """Exact length (text + image tokens) of every sample when its batch is drawn with `budget`."""
        if budget is None or not self.budgets:
            return self.lengths
        if budget not in self._lengths_at:
            self._lengths_at[budget] = [
                int(text_length) + self._plan_row(sizes, budget)[0]
                for sizes, text_length in zip(self._image_sizes, self._text_lengths)
            ]
        return self._lengths_at[budget]

    def bucket_of(self, plan: ImagePlan) -> tuple[int, int]:
        return image_bucket(plan, self.snapping, self.size_buckets, self.aspect_ratio_edges)

    @classmethod
    def from_dataset(
        cls,
        dataset,
        image_processor,
        text_length: Callable[[dict], int] | str,
        image_column: str | None = None,
        skip_bad_images: bool = False,
        **kwargs,
    ) -> BucketBatchSampler:
        """A sampler for a dataset of rows (a `datasets.Dataset` or a list of dicts) with images.

        Image sizes come from columns when the dataset has them -- `image_sizes` (per row, [height, width] of each
        image; `processing.add_image_sizes` adds it in parallel, cached) or `height` + `width` -- and otherwise
        from the image files' headers ("images" or "image" column, or `image_column`); no image is decoded either
        way. `text_length` is the name of a column of text lengths (fast: `processing.add_text_lengths`) or a
        function of a row without its image column (e.g. `NanoVLMCollator(processor).text_length`).
        `skip_bad_images`: an unreadable header counts as an image of no tokens instead of an error (the collator
        then raises on that row, or skips it with `skip_bad_rows`). See `processing/training/sizes.py`.
        """
        from .sizes import dataset_image_sizes, dataset_text_lengths

        image_sizes = dataset_image_sizes(dataset, image_column, skip_bad_images)
        text_lengths = dataset_text_lengths(dataset, text_length, image_column)
        return cls(image_sizes, text_lengths, image_processor, **kwargs)

    # --- the epoch's batches -----------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in order, before any sharding across processes."""
        if self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        tie_break = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))

        by_bucket = defaultdict(list)
        for index, key in enumerate(self.keys):
            by_bucket[key].append(index)
        batches, leftovers = [], []
        for key in sorted(by_bucket):
            members = self._sorted_members(by_bucket[key], tie_break)
            if self.max_tokens_per_batch is not None:
                batches += self._pack(members)
            else:
                full = len(members) - len(members) % self.rows_per_batch
                batches += _chunks(members[:full], self.rows_per_batch)
                leftovers += members[full:]  # bucket by bucket, still sorted: neighbours stay similar
        if leftovers:
            batches += _chunks(leftovers, self.rows_per_batch)
        batches = self._split_for_replicas(batches)

        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.batch_size is not None:  # a short batch goes last, as a plain BatchSampler would give it
            batches.sort(key=lambda batch: len(batch) < self.batch_size)
        self._cached = (epoch, batches)
        return batches

    def _sorted_members(self, members: list[int], tie_break: np.ndarray) -> list[int]:
        """A bucket's samples by rounded length (longest first), then exact image shapes, then `tie_break`."""
        members = np.asarray(members, dtype=np.int64)
        order = np.lexsort((tie_break[members], self._sort_shapes[members], self._sort_lengths[members]))
        return members[order].tolist()

    def batch_budgets(self, epoch: int) -> list[int] | None:
        """The image-token budget of each of `epoch`'s batches (in `batches(epoch)` order); None without budgets.

        Balanced: every entry of `budgets` goes to the same number of batches, give or take one (a random subset
        of them when there are fewer batches than entries; a budget listed twice gets twice the batches). Drawn
        from its own random stream of (seed, epoch), so adding budgets leaves the batches themselves as they were.
        """
        if not self.budgets:
            return None
        count = len(self.batches(epoch))
        rng = np.random.default_rng([self.seed, epoch, 1])
        rounds = -(-count // len(self.budgets))
        pool = np.concatenate([rng.permutation(self.budgets) for _ in range(rounds)])[:count]
        return [int(budget) for budget in rng.permutation(pool)]

    def _pack(self, members: list[int]) -> list[list[int]]:
        return pack_by_tokens(members, self.rounded_lengths.__getitem__, self.max_tokens_per_batch, self.rows_per_batch)

    def _split_for_replicas(self, batches: list[list[int]]) -> list[list[int]]:
        """Halve the largest batches until every process gets the same number (never repeats a sample)."""
        while len(batches) % self.num_replicas:
            largest = max(range(len(batches)), key=lambda b: len(batches[b]))
            batch = batches[largest]
            if len(batch) < 2:
                raise ValueError(
                    f"cannot split {len(batches)} single-sample batches evenly over {self.num_replicas} processes "
                    "without repeating samples; raise max_tokens_per_batch or use fewer processes"
                )
            half = (len(batch) + 1) // 2
            batches[largest : largest + 1] = [batch[:half], batch[half:]]
        return batches

    # --- torch Sampler protocol, epochs, resuming --------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration batches (its order is a function of (seed, epoch)); with
        `sizes_for_epoch`, also re-plans from that epoch's sizes."""
        self._plan_epoch(epoch)
        if epoch != self.epoch:  # a resume point only holds for its own epoch
            self._yielded = self._skip = 0
        self.epoch = epoch

    def _plan_epoch(self, epoch: int) -> None:
        if self.sizes_for_epoch is not None and epoch != self._planned_epoch:
            self.replan(self.sizes_for_epoch(epoch))
            self._planned_epoch = epoch

    def __len__(self) -> int:
        return self.num_batches - self._skip

    def __iter__(self):
        batches = self.batches(self.epoch)
        budgets = self.batch_budgets(self.epoch)
        start, self._skip = self._skip, 0
        self._yielded = start
        for position in range(start, len(batches)):
            self._yielded += 1
            if budgets is None:
                yield list(batches[position])
            else:
                plan = {self.budget_setting: budgets[position]}
                yield [PlannedIndex(index, plan) for index in batches[position]]

    def state_dict(self) -> dict:
        """Where the current epoch stands: batches handed out so far (by this sampler, before sharding)."""
        return {"seed": self.seed, "epoch": self.epoch, "num_batches_yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues `state`'s epoch after the batches it had already yielded."""
        if state["seed"] != self.seed:
            raise ValueError(f"the state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self._plan_epoch(state["epoch"])
        self.epoch = state["epoch"]
        self._skip = self._yielded = state["num_batches_yielded"]


def _check_budgets(budgets, plan_overrides: dict, setting: str = "max_image_tokens") -> tuple[int, ...] | None:
    if budgets is None:
        return None
    if isinstance(budgets, (int, np.integer)):
        raise TypeError(f"budgets must be a sequence of token budgets such as [144, 64, 36, 16], got {budgets!r}")
    budgets = list(budgets)
    if not budgets:
        raise ValueError("budgets is empty; give at least one image-token budget or leave it None")
    bad = [budget for budget in budgets if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool)
           or budget < 1]
    if bad:
        per = "per image" if setting == "max_image_tokens" else "per sample"
        raise ValueError(f"budgets must be positive integers (image tokens {per}), got {bad}")
    if plan_overrides.get(setting) is not None:
        raise ValueError(
            f"plan_overrides sets {setting}={plan_overrides[setting]} and budgets are given: "
            f"the drawn budget is the {setting} of each batch, so give one or the other"
        )
    return tuple(sorted((int(budget) for budget in budgets), reverse=True))  # a repeated budget weighs more


def pack_by_tokens(members: list, length_of: Callable, max_tokens: int, max_rows: int | None = None) -> list[list]:
    """Greedy cut of `members`, sorted longest first, into batches whose padded size (rows x the first row's
    `length_of`) stays within `max_tokens` and whose rows stay within `max_rows` (the sampler's and the stream's
    `max_tokens_per_batch` batching)."""
    batches, batch = [], []
    for member in members:
        longest = length_of(batch[0] if batch else member)  # sorted: the first is the longest
        too_many_tokens = (len(batch) + 1) * longest > max_tokens
        too_many_rows = max_rows is not None and len(batch) >= max_rows
        if batch and (too_many_tokens or too_many_rows):
            batches.append(batch)
            batch = []
        batch.append(member)
    return batches + [batch] if batch else batches


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


__all__ = ["BucketBatchSampler", "PlannedIndex", "bucket_key", "SIZE_BUCKETS", "ASPECT_RATIO_EDGES"]
