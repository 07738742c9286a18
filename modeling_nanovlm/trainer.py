"""NanoVLMTrainer: the stock transformers Trainer, fed by the bucketing batch sampler.

Not part of the Hub export (the model's remote code never imports it), so it may import from `processing`.
"""

from __future__ import annotations

import math
import os
from functools import partial

from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import seed_worker
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

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
      - `image_token_budgets=[144, 64, 36, 16]` trains one model for a range of budgets: every batch draws its
        `max_image_tokens` from the list (see `BucketBatchSampler`'s `budgets`); the train dataset is wrapped in
        `PlannedRows`, so each row carries `"__index__"` and its batch's `"__plan__"` to the collator;
      - `remove_unused_columns` is turned off: the image and chat columns are what the collator reads;
      - the data collator defaults to `NanoVLMCollator(processing_class)` when a processor is given;
      - the sampler's epoch is set at every epoch start, also when resuming on several processes (accelerate
        wraps the sampler twice then, and the stock Trainer reaches one level only);
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
        image_token_budgets: list[int] | None = None,
        **kwargs,
    ):
        if batch_sampler is not None and image_token_budgets is not None:
            raise ValueError(
                "image_token_budgets configures the batch sampler NanoVLMTrainer builds; with your own batch_sampler "
                "pass budgets=... to it instead (BucketBatchSampler(..., budgets=[144, 64, 36, 16]))"
            )
        processor = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and hasattr(processor, "image_processor"):
            from processing import NanoVLMCollator

            kwargs["data_collator"] = NanoVLMCollator(processor)
        super().__init__(*args, **kwargs)
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
        self.image_token_budgets = image_token_budgets
        self.add_callback(_SamplerEpochCallback(self))

    def build_train_batch_sampler(self):
        from processing import BucketBatchSampler, NanoVLMCollator

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
        )

    def get_train_dataloader(self) -> DataLoader:
        from processing import PlannedRows

        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
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
        dataloader = DataLoader(
            PlannedRows(self.train_dataset),  # rows carry their index and their batch's drawn budget
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor,
            in_order=args.dataloader_in_order,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        return self.accelerator.prepare(dataloader)

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


class _SamplerEpochCallback(TrainerCallback):
    """Sets the batch sampler's epoch when an epoch begins.

    The stock Trainer reaches a batch sampler through one accelerate wrapper (`BatchSamplerShard`); resuming on
    several processes adds a second (`SkipBatchSampler`), and the sampler would keep its old epoch. At epoch
    begin, `state.epoch` is the epoch index exactly (fresh epoch) or lies inside it (resumed mid-epoch).
    """

    def __init__(self, trainer: NanoVLMTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer.train_batch_sampler
        if sampler is not None:
            sampler.set_epoch(math.floor(state.epoch or 0))


__all__ = ["NanoVLMTrainer"]
