"""PlannedRows: a map-style dataset whose rows carry their index and their batch's plan to the collator."""

from __future__ import annotations

from torch.utils.data import Dataset

from .collator import PLAN_KEY
from .sampler import PlannedIndex
from .sizes import INDEX_KEY


class PlannedRows(Dataset):
    r"""Wraps a map-style dataset so that each row also holds `"__index__"` and, when the key says so, `"__plan__"`.

    Keys are dataset indices, or the `PlannedIndex(index, plan)` keys that a `BucketBatchSampler` with `budgets`
    yields: `PlannedRows(dataset)[PlannedIndex(7, {"max_image_tokens": 64})]` is row 7 with
    `"__index__": 7, "__plan__": {"max_image_tokens": 64}`. `NanoVLMCollator` passes `__plan__` to the
    processor call and ignores both keys otherwise. `NanoVLMTrainer` wraps its train dataset in this itself;
    a plain `DataLoader` needs it when its batch sampler has budgets:

        DataLoader(PlannedRows(dataset), batch_sampler=BucketBatchSampler(..., budgets=[144, 64, 36, 16]),
                   collate_fn=NanoVLMCollator(processor))
    """

    def __init__(self, dataset):
        if isinstance(dataset, PlannedRows):
            dataset = dataset.dataset
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        if isinstance(key, PlannedIndex):
            index, plan = key
        else:
            index, plan = key, None
        row = self.dataset[int(index)]
        if not isinstance(row, dict):
            raise ValueError(f"dataset row {index}: expected a dict, got {type(row).__name__}")
        row = {INDEX_KEY: int(index), **row}  # an index the rows already carry (e.g. in the loaded split) wins
        if plan:
            row[PLAN_KEY] = dict(plan)
        return row

    def __getattr__(self, name):  # column_names, set_epoch, ...: whatever the wrapped dataset offers
        if name == "dataset":  # not set yet (e.g. while unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.dataset, name)


__all__ = ["PlannedRows", "PlannedIndex", "INDEX_KEY", "PLAN_KEY"]
