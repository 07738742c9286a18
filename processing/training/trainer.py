"""NanoVLMTrainer: the stock transformers Trainer, fed by the bucketing batch sampler.

Not part of the Hub export: the model's remote code never imports it.
"""

from __future__ import annotations

import math
import os
from functools import partial

from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput, seed_worker
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from .collator import NanoVLMCollator
from .rows import PlannedRows
from .sampler import BucketBatchSampler
from .streaming import StreamingBucketBatches

logger = logging.get_logger(__name__)


class NanoVLMTrainer(Trainer):
    r"""`transformers.Trainer` whose training batches come from a `BucketBatchSampler`.

    Differences from the stock Trainer, and why:
      - the train DataLoader is built with `batch_sampler=` (the stock Trainer only passes plain samplers through
        `_get_train_sampler`) and then prepared by accelerate, which shards its batches over processes;
      - unless `batch_sampler` is given, the sampler is built from the train dataset with
        `BucketBatchSampler.from_dataset`: rows per batch = `per_device_train_batch_size` (a cap when
        `max_tokens_per_batch` is given), seed = `data_seed` or `seed`, `num_replicas` = `world_size`, text
        lengths from the `NanoVLMCollator`, image sizes from file headers;
      - a streamed train dataset (`datasets.IterableDataset`, or a `StreamingBucketBatches`) is batched by
        `StreamingBucketBatches` (buffered bucketing, `stream_buffer_size` rows; each process reads its own rows via
        `split_dataset_by_node`), and a resumed run skips the checkpoint's steps inside the stream (exact replay);
      - `image_token_budgets=[144, 64, 36, 16]` trains one model for a range of budgets: every batch draws its
        `max_image_tokens` from the list (see `BucketBatchSampler`'s `budgets`); the train dataset is wrapped in
        `PlannedRows`, so each row carries `"__index__"` and its batch's `"__plan__"` to the collator;
        `image_token_budgets_per_sample=[288, 144, 64]` draws `max_image_tokens_per_sample` instead, a budget
        shared by the images of each sample (give one or the other);
      - `remove_unused_columns` is turned off: the image and chat columns are what the collator reads;
      - the data collator defaults to `NanoVLMCollator(processing_class)` when a processor is given;
      - a processor whose plans the model would refuse is an error here, before any data is read
        (`NanoVLMProcessor.check_model_config`), rather than at the first forward;
      - the sampler's epoch is set at every epoch start, also when resuming on several processes (accelerate
        wraps the sampler twice then, and the stock Trainer reaches one level only);
      - DataLoader workers by default: when `args.dataloader_num_workers` is left at 0 and `auto_workers=True` (the
        default), the train DataLoader uses `default_dataloader_workers()` workers (min(4, CPUs per process - 1),
        0 on a machine with 2 or fewer CPUs per process, where workers measured slower than none), with the stock
        `prefetch_factor` (2) unless `args.dataloader_prefetch_factor` is set. A nonzero
        `dataloader_num_workers` is used as given; `auto_workers=False` keeps 0. Batches, losses and resume are
        the same with any number of workers (the sampler decides the batches; the collator has no randomness).
        Workers start at every epoch, after the sampler's (and a dataset's) `set_epoch`; with
        `dataloader_persistent_workers=True` they would keep the dataset as it was in the first epoch;
      - checkpoints are loaded back through `from_pretrained`: `save_pretrained` writes the vision tower's keys in
        DINOv3's original layout, and the stock resume path loads keys as they are on disk, silently leaving the
        tower's layers untrained (huggingface/transformers#43701, open in 5.24).
    Loss normalisation under gradient accumulation is the stock one: the model's forward takes **kwargs, so the
    Trainer passes `num_items_in_batch` (answer tokens of the whole accumulated batch, over all processes) to the
    LM loss.
    """

    def __init__(
        self,
        *args,
        batch_sampler=None,
        max_tokens_per_batch: int | None = None,
        stream_buffer_size: int = 1024,
        auto_workers: bool = True,
        image_token_budgets: list[int] | None = None,
        image_token_budgets_per_sample: list[int] | None = None,
        **kwargs,
    ):
        if image_token_budgets is not None and image_token_budgets_per_sample is not None:
            raise ValueError(
                "give image_token_budgets (per image) or image_token_budgets_per_sample (shared by a sample's "
                "images), not both: a batch draws one budget"
            )
        budget_setting = "max_image_tokens" if image_token_budgets_per_sample is None else "max_image_tokens_per_sample"
        if image_token_budgets is None:
            image_token_budgets = image_token_budgets_per_sample
        if batch_sampler is not None and image_token_budgets is not None:
            raise ValueError(
                "image_token_budgets configures the batch sampler NanoVLMTrainer builds; with your own batch_sampler "
                "pass budgets=... to it instead (BucketBatchSampler(..., budgets=[144, 64, 36, 16]))"
            )
        processor = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and hasattr(processor, "image_processor"):
            kwargs["data_collator"] = NanoVLMCollator(processor)
        super().__init__(*args, **kwargs)
        if hasattr(processor, "check_model_config"):  # a processor that does not fit the model fails here, not later
            processor.check_model_config(self.model.config)
        if self.args.remove_unused_columns:
            logger.info("NanoVLMTrainer: remove_unused_columns=False, the collator needs the image and text columns")
            self.args.remove_unused_columns = False
        if not self.model_accepts_loss_kwargs:
            logger.warning(
                "the model's forward does not take **kwargs, so the loss cannot be normalised over the whole "
                "accumulated batch (num_items_in_batch); gradient accumulation will weight micro-batches equally"
            )
        self.train_batch_sampler = batch_sampler
        self._sampler_is_built_here = batch_sampler is None
        self.max_tokens_per_batch = max_tokens_per_batch
        self.stream_buffer_size = stream_buffer_size
        self.train_stream = None  # the StreamingBucketBatches, when the train dataset is streamed
        self._stream_resume_batches = 0
        self.auto_workers = auto_workers
        self.image_token_budgets = image_token_budgets  # the drawn values, of `budget_setting`
        self.budget_setting = budget_setting
        self.add_callback(_SamplerEpochCallback(self))

    def build_train_batch_sampler(self) -> BucketBatchSampler:
        """The `BucketBatchSampler` over the train dataset, with the settings the class docstring lists."""
        if not isinstance(self.data_collator, NanoVLMCollator):
            raise ValueError(
                "NanoVLMTrainer builds its batch sampler from a NanoVLMCollator (it knows the processor and row "
                "format); pass data_collator=NanoVLMCollator(processor) or batch_sampler=BucketBatchSampler(...)"
            )
        collator = self.data_collator
        return BucketBatchSampler.from_dataset(
            self.train_dataset,
            collator.processor.image_processor,
            text_length=collator.text_length,
            batch_size=self._train_batch_size,
            max_tokens_per_batch=self.max_tokens_per_batch,
            num_replicas=self.args.world_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            shuffle=self.args.train_sampling_strategy != "sequential",
            plan_overrides=collator.plan_overrides,
            budgets=self.image_token_budgets,
            budget_setting=self.budget_setting,
        )

    def get_train_dataloader(self) -> DataLoader:
        """The train DataLoader: batches from the bucketing sampler (or the stream), prepared by accelerate."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if _is_stream(self.train_dataset):
            if self.image_token_budgets is not None:
                raise ValueError(
                    "image_token_budgets needs a map-style train dataset (the sampler draws a budget per batch of "
                    "known lengths); a streamed dataset is batched by StreamingBucketBatches, which has no budgets: "
                    "drop image_token_budgets or train on a datasets.Dataset"
                )
            return self.get_streaming_train_dataloader()
        # Built once (it reads every image header); again only if auto_find_batch_size changed the batch size.
        if self.train_batch_sampler is None or (
            self._sampler_is_built_here and self.train_batch_sampler.rows_per_batch != self._train_batch_size
        ):
            self.train_batch_sampler = self.build_train_batch_sampler()
        sampler = self.train_batch_sampler
        if sampler.num_replicas != self.args.world_size:
            raise ValueError(
                f"the batch sampler was built for num_replicas={sampler.num_replicas} but training runs on "
                f"{self.args.world_size} processes; samples would be repeated or processes would get unequal batches"
            )
        args = self.args
        num_workers = args.dataloader_num_workers
        if num_workers == 0 and self.auto_workers:
            num_workers = default_dataloader_workers()
            logger.info(
                f"NanoVLMTrainer: {num_workers} DataLoader worker(s) (auto_workers; set dataloader_num_workers)"
            )
        dataloader = DataLoader(
            PlannedRows(self.train_dataset),  # rows carry their index and their batch's drawn budget
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor if num_workers else None,
            in_order=args.dataloader_in_order,
            worker_init_fn=partial(seed_worker, num_workers=num_workers, rank=args.process_index),
        )
        return self.accelerator.prepare(dataloader)

    # --- streamed datasets: buffered bucketing, one shard of the stream per process -------------------------

    def build_train_stream(self) -> StreamingBucketBatches:
        """The `StreamingBucketBatches` over a streamed train dataset: this process's rows, bucketed in a buffer."""
        if isinstance(self.train_dataset, StreamingBucketBatches):
            stream = self.train_dataset
            if (stream.rank, stream.world_size) != (self.args.process_index, self.args.world_size):
                raise ValueError(
                    f"the StreamingBucketBatches was built for rank {stream.rank} of {stream.world_size} but this is "
                    f"process {self.args.process_index} of {self.args.world_size}; build it with "
                    "rank=args.process_index, world_size=args.world_size (or pass the datasets.IterableDataset)"
                )
        else:
            if not isinstance(self.data_collator, NanoVLMCollator):
                raise ValueError(
                    "NanoVLMTrainer buckets a streamed dataset with a NanoVLMCollator (it knows the processor and row "
                    "format); pass data_collator=NanoVLMCollator(processor), or a StreamingBucketBatches as "
                    "train_dataset"
                )
            collator = self.data_collator
            stream = StreamingBucketBatches(
                self.train_dataset,
                collator.processor.image_processor,
                text_length=collator.text_length,
                batch_size=self._train_batch_size,
                max_tokens_per_batch=self.max_tokens_per_batch,
                buffer_size=self.stream_buffer_size,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                shuffle=self.args.train_sampling_strategy != "sequential",
                rank=self.args.process_index,
                world_size=self.args.world_size,
                plan_overrides=collator.plan_overrides,
            )
        # One endless stream of batches, epoch after epoch: a resumed run then continues at the exact batch, also
        # across epoch boundaries (the Trainer itself can only skip batches of its first epoch).
        stream.repeat = True
        return stream

    def get_streaming_train_dataloader(self) -> DataLoader:
        """A DataLoader over this process's own batches, placed on the device but not sharded again.

        Each process reads its own rows (`split_dataset_by_node`), so accelerate must neither dispatch batches from
        process 0 (its default for an IterableDataset: it would concatenate batches of different shapes and the
        other processes' rows would never be read) nor slice this process's batches once more.
        """
        from accelerate.data_loader import prepare_data_loader

        args = self.args
        if args.dataloader_num_workers:
            raise ValueError(
                f"dataloader_num_workers={args.dataloader_num_workers}: a streamed dataset is bucketed in the main "
                "process (each worker would read and hand out the same batches); use dataloader_num_workers=0"
            )
        self.train_stream = self.build_train_stream()
        if self._stream_resume_batches:
            self.train_stream.load_state_dict({**self.train_stream.state_dict(), "epoch": 0,
                                               "num_batches_yielded": self._stream_resume_batches})
        dataloader = DataLoader(
            _EndlessStream(self.train_stream),
            batch_size=None,  # the stream yields whole batches
            collate_fn=self.data_collator,
            pin_memory=args.dataloader_pin_memory,
        )
        prepared = prepare_data_loader(
            dataloader,
            self.accelerator.device,
            num_processes=1,
            process_index=0,
            put_on_device=self.accelerator.device_placement,
            dispatch_batches=False,
            non_blocking=self.accelerator.non_blocking,
        )
        self.accelerator._dataloaders.append(prepared)  # as Accelerator.prepare_data_loader registers it
        return prepared

    def train(self, resume_from_checkpoint=None, *args, **kwargs) -> TrainOutput:
        """`Trainer.train`; resuming on a streamed dataset, the stream skips the batches of the checkpoint's steps
        itself."""
        self._stream_resume_batches = 0
        if not resume_from_checkpoint or not _is_stream(self.train_dataset) or self.args.ignore_data_skip:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        from transformers.trainer_callback import TrainerState

        state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
        # Every optimizer step took gradient_accumulation_steps batches from the (endless) stream of each process.
        self._stream_resume_batches = state.global_step * self.args.gradient_accumulation_steps
        self.args.ignore_data_skip = True  # the stream skips; the Trainer's skip would count from its epoch 0
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.args.ignore_data_skip = False
            self._stream_resume_batches = 0

    # --- checkpoints: load them the way they were saved ----------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        model = self.model if model is None else model
        if not self._load_with_from_pretrained(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_with_from_pretrained(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _load_with_from_pretrained(self, checkpoint: str, model) -> bool:
        """Copy the weights of `type(model).from_pretrained(checkpoint)` into `model`; False where that does not apply.

        from_pretrained applies the same key conversions save_pretrained reverted. FSDP and DeepSpeed checkpoints
        are written in their own formats (with the model's own keys) and keep the stock path.
        """
        saved_by_save_pretrained = any(
            os.path.isfile(os.path.join(checkpoint, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        )
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not saved_by_save_pretrained:
            return False
        model = self.accelerator.unwrap_model(model)
        if not isinstance(model, PreTrainedModel):
            return False
        logger.info(f"Loading model weights from {checkpoint} with {type(model).__name__}.from_pretrained")
        loaded = type(model).from_pretrained(checkpoint, config=model.config, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict())  # strict: every key must match now
        return True


def _is_stream(dataset) -> bool:
    return isinstance(dataset, IterableDataset)


class _EndlessStream(IterableDataset):
    """The trainer's view of a `StreamingBucketBatches`: no `set_epoch`, so the DataLoader's epoch counter (which
    restarts at 0 on resume) never moves the stream; the stream moves on to its next epoch by itself."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        return iter(self.stream)


def default_dataloader_workers(cpus: int | None = None, processes_per_node: int | None = None) -> int:
    """DataLoader workers for one training process: min(4, its CPUs - 1), and 0 with 2 CPUs or fewer.

    The CPUs available to this process (its affinity) are shared by the processes on this node (`LOCAL_WORLD_SIZE`,
    set by torchrun and accelerate). One CPU is left to the training loop; with 2 or fewer, workers only compete
    with it (measured slower than loading in the training process: benchmarks/throughput.py).
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if processes_per_node is None:
        processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    per_process = cpus // max(1, processes_per_node)
    return 0 if per_process <= 2 else min(4, per_process - 1)


class _SamplerEpochCallback(TrainerCallback):
    """Sets the batch sampler's epoch when an epoch begins.

    The stock Trainer reaches a batch sampler through one accelerate wrapper (`BatchSamplerShard`); resuming on
    several processes adds a second (`SkipBatchSampler`), and the sampler would keep its old epoch. At epoch
    begin, `state.epoch` is the epoch index exactly (fresh epoch) or lies inside it (resumed mid-epoch).
    """

    def __init__(self, trainer: NanoVLMTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        """Hands the sampler the epoch that begins (its floor, when a resumed run starts inside it)."""
        sampler = self.trainer.train_batch_sampler
        if sampler is not None:
            sampler.set_epoch(math.floor(state.epoch or 0))


__all__ = ["NanoVLMTrainer", "default_dataloader_workers"]
