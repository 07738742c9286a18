"""Budget-robust training: BucketBatchSampler(budgets=...), PlannedRows, the collator's `__plan__`, the Trainer flag.

Every batch draws its `max_image_tokens` from the budgets, deterministically from (seed, epoch); the sampler knows
every sample's exact length at the drawn budget; resuming and sharding over N processes stay exact.
"""

import pickle
import random

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import DataLoader

from processing import (
    BucketBatchSampler,
    NanoVLMCollator,
    NanoVLMImageProcessor,
    NanoVLMProcessor,
    PlannedIndex,
    PlannedRows,
)

NUM_SAMPLES = 101  # prime: no batch size or process count divides it
BUDGETS = [144, 64, 36, 16]


@pytest.fixture(scope="module")
def image_processor():
    return NanoVLMImageProcessor(max_image_tokens=144, max_image_size=384, shuffle_factors=(2, 4))


@pytest.fixture(scope="module")
def sizes():
    rng = random.Random(0)
    image_sizes = [(rng.randint(96, 384), rng.randint(96, 384)) for _ in range(NUM_SAMPLES)]
    image_sizes[5] = [(200, 300), (120, 100)]  # two images
    image_sizes[9] = []  # text only
    text_lengths = [rng.randint(10, 40) for _ in range(NUM_SAMPLES)]
    return image_sizes, text_lengths


def make(sizes, image_processor, **kwargs):
    image_sizes, text_lengths = sizes
    return BucketBatchSampler(image_sizes, text_lengths, image_processor, **{"budgets": BUDGETS, **kwargs})


def as_pairs(batches):
    """[(index, budget), ...] per batch, from what the sampler (or a DataLoader over it) yields."""
    return [[(key.index, key.plan["max_image_tokens"]) for key in batch] for batch in batches]


# --- the draw --------------------------------------------------------------------------------------------


def test_batches_carry_one_budget_each_drawn_from_the_list(sizes, image_processor):
    sampler = make(sizes, image_processor, batch_size=8, seed=1)
    batches = list(sampler)
    assert all(isinstance(key, PlannedIndex) for batch in batches for key in batch)
    budgets = [batch[0].plan["max_image_tokens"] for batch in batches]
    assert all({key.plan["max_image_tokens"] for key in batch} == {budget} for batch, budget in zip(batches, budgets))
    assert budgets == sampler.batch_budgets(0)
    counts = [budgets.count(budget) for budget in BUDGETS]
    assert max(counts) - min(counts) <= 1  # balanced: every budget gets its share of the batches
    # the batches themselves are those of the same sampler without budgets: the draw only adds the plan
    plain = BucketBatchSampler(*sizes, image_processor, batch_size=8, seed=1)
    assert [[key.index for key in batch] for batch in batches] == plain.batches(0)
    assert sorted(key.index for batch in batches for key in batch) == list(range(NUM_SAMPLES))


def test_a_repeated_budget_is_drawn_more_often(sizes, image_processor):
    sampler = make(sizes, image_processor, batch_size=4, budgets=[64, 16, 16, 16])
    budgets = sampler.batch_budgets(0)
    assert budgets.count(16) >= 3 * budgets.count(64) - 3 and set(budgets) == {64, 16}


def test_the_draw_is_a_function_of_seed_and_epoch(sizes, image_processor):
    first = make(sizes, image_processor, batch_size=8, seed=3)
    second = make(sizes, image_processor, batch_size=8, seed=3)
    draws = []
    for epoch in (0, 1, 2):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        assert as_pairs(first) == as_pairs(second)
        draws.append(first.batch_budgets(epoch))
    assert draws[0] != draws[1] or draws[1] != draws[2]  # each epoch draws anew
    other_seed = make(sizes, image_processor, batch_size=8, seed=4)
    assert as_pairs(other_seed) != as_pairs(make(sizes, image_processor, batch_size=8, seed=3))


def test_exact_lengths_at_every_drawn_budget(sizes, image_processor):
    image_sizes, text_lengths = sizes
    sampler = make(sizes, image_processor, max_tokens_per_batch=400, batch_size=16)
    for budget in BUDGETS:
        expected = [
            text + sum(image_processor.num_image_tokens(h, w, max_image_tokens=budget)
                       for h, w in (size if isinstance(size, list) else [size]))
            for size, text in zip(image_sizes, text_lengths)
        ]
        assert sampler.lengths_at(budget) == expected
    assert sampler.lengths == sampler.lengths_at(max(BUDGETS))  # batches are cut at the largest budget
    assert sampler.lengths_at(16) != sampler.lengths_at(144)  # and the budget matters on these sizes
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch in sampler:
            budget = batch[0].plan["max_image_tokens"]
            exact = sampler.lengths_at(budget)
            assert len(batch) * max(exact[key.index] for key in batch) <= 400  # the token cap holds at the draw


def test_resume_mid_epoch_gives_the_remaining_batches_with_their_budgets(sizes, image_processor):
    sampler = make(sizes, image_processor, batch_size=8, seed=2)
    sampler.set_epoch(1)
    expected = as_pairs(sampler)
    sampler.set_epoch(1)
    iterator = iter(sampler)
    for _ in range(4):
        next(iterator)
    state = sampler.state_dict()
    resumed = make(sizes, image_processor, batch_size=8, seed=2)
    resumed.load_state_dict(state)
    assert len(resumed) == len(expected) - 4
    assert as_pairs(resumed) == expected[4:]
    # and the Trainer's way: accelerate's skip_first_batches over the DataLoader
    fresh = make(sizes, image_processor, batch_size=8, seed=2)
    fresh.set_epoch(1)
    loader = DataLoader(PlannedRows([{"row": index} for index in range(NUM_SAMPLES)]), batch_sampler=fresh,
                        collate_fn=list)
    skipped = skip_first_batches(loader, 4)
    assert [[(row["__index__"], row["__plan__"]["max_image_tokens"]) for row in batch] for batch in skipped] == (
        expected[4:])


@pytest.mark.parametrize("num_processes", [2, 3])
@pytest.mark.parametrize("options", [dict(batch_size=8), dict(max_tokens_per_batch=500, batch_size=12)])
def test_every_sample_exactly_once_on_n_processes_with_its_batch_budget(sizes, image_processor, num_processes,
                                                                        options):
    seen = []
    counts = set()
    for process_index in range(num_processes):
        sampler = make(sizes, image_processor, num_replicas=num_processes, seed=5, **options)
        sampler.set_epoch(1)
        dataset = PlannedRows([{"row": index} for index in range(NUM_SAMPLES)])
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=list)
        loader = prepare_data_loader(loader, num_processes=num_processes, process_index=process_index,
                                     put_on_device=False)
        batches = [[(row["__index__"], row["__plan__"]["max_image_tokens"]) for row in batch] for batch in loader]
        counts.add(len(batches))
        for batch in batches:
            assert len({budget for _, budget in batch}) == 1
        seen += [index for batch in batches for index, _ in batch]
    assert sorted(seen) == list(range(NUM_SAMPLES)) and len(counts) == 1


def test_bad_budgets_are_clear_errors(sizes, image_processor):
    for bad, message in ((64, "sequence"), ([], "empty"), ([64, 0], "positive integers"), ([64, 2.5], "positive"),
                         (["64"], "positive")):
        with pytest.raises((TypeError, ValueError), match=message):
            make(sizes, image_processor, batch_size=8, budgets=bad)
    with pytest.raises(ValueError, match="one or the other"):
        make(sizes, image_processor, batch_size=8, plan_overrides={"max_image_tokens": 64})
    perceiver = NanoVLMImageProcessor(max_image_tokens=144, max_image_size=384, connector="perceiver",
                                      perceiver_latents=16)
    with pytest.raises(ValueError, match="budget 8: .*16 tokens per image"):
        BucketBatchSampler(*sizes, perceiver, batch_size=8, budgets=[64, 8])


def test_planned_index_survives_pickling_for_dataloader_workers():
    key = PlannedIndex(7, {"max_image_tokens": 36})
    assert pickle.loads(pickle.dumps(key)) == key


# --- rows and the collator --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(image_processor):
    from offline_tokenizer import build_tokenizer

    tokenizer = build_tokenizer(["Which digit is shown and where? 7 top-left 3 bottom-right"] * 10)
    return NanoVLMProcessor(image_processor=image_processor, tokenizer=tokenizer)


def image_rows(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.integers(0, 256, (int(rng.integers(96, 384)), int(rng.integers(96, 384)), 3), dtype=np.uint8),
         "prompt": "Which digit is shown and where?", "answer": "7 top-left"}
        for _ in range(count)
    ]


def test_planned_rows_add_index_and_plan():
    rows = PlannedRows([{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "d"}])
    assert rows[1] == {"prompt": "c", "answer": "d", "__index__": 1}
    assert rows[PlannedIndex(0, {"max_image_tokens": 16})] == {
        "prompt": "a", "answer": "b", "__index__": 0, "__plan__": {"max_image_tokens": 16}}
    assert len(rows) == 2 and PlannedRows(rows).dataset is rows.dataset


def test_collated_batches_have_exactly_the_planned_lengths_at_the_drawn_budget(processor):
    rows = image_rows(12)
    collator = NanoVLMCollator(processor)
    sampler = BucketBatchSampler.from_dataset(rows, processor.image_processor, collator.text_length, batch_size=3,
                                              budgets=BUDGETS, seed=0)
    loader = DataLoader(PlannedRows(rows), batch_sampler=sampler, collate_fn=collator)
    drawn = sampler.batch_budgets(0)
    assert len(set(drawn)) == len(BUDGETS)
    for batch, keys, budget in zip(loader, sampler.batches(0), drawn):
        exact = sampler.lengths_at(budget)
        assert batch["attention_mask"].sum(1).tolist() == [exact[i] for i in keys]
        assert batch["input_ids"].shape[1] == max(exact[i] for i in keys)
        image_tokens = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
        expected = [processor.num_image_tokens(*rows[i]["image"].shape[:2], max_image_tokens=budget) for i in keys]
        assert image_tokens == expected


def test_collator_applies_the_rows_plan_on_top_of_its_own(processor):
    rows = image_rows(2, seed=1)
    plain = NanoVLMCollator(processor)(rows)
    planned = NanoVLMCollator(processor)([{**row, "__plan__": {"max_image_tokens": 16}} for row in rows])
    assert (planned["input_ids"] == processor.image_token_id).sum(1).tolist() == [
        processor.num_image_tokens(*row["image"].shape[:2], max_image_tokens=16) for row in rows]
    assert planned["input_ids"].shape[1] < plain["input_ids"].shape[1]
    # the row's plan wins over the collator's plan_overrides for the same field; other fields stay
    overriding = NanoVLMCollator(processor, plan_overrides={"max_image_tokens": 144, "max_image_size": 192})
    batch = overriding([{**row, "__plan__": {"max_image_tokens": 16}} for row in rows])
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [
        processor.num_image_tokens(*row["image"].shape[:2], max_image_tokens=16, max_image_size=192) for row in rows]


def test_collator_refuses_rows_that_disagree_or_unknown_settings(processor):
    rows = image_rows(2, seed=2)
    collator = NanoVLMCollator(processor)
    with pytest.raises(ValueError, match="different __plan__"):
        collator([{**rows[0], "__plan__": {"max_image_tokens": 16}}, {**rows[1], "__plan__": {"max_image_tokens": 64}}])
    with pytest.raises(ValueError, match="different __plan__"):
        collator([{**rows[0], "__plan__": {"max_image_tokens": 16}}, rows[1]])
    with pytest.raises(ValueError, match="unknown plan setting"):
        collator([{**row, "__plan__": {"max_tokens": 16}} for row in rows])
    with pytest.raises(ValueError, match="must be a dict"):
        collator([{**row, "__plan__": 16} for row in rows])


# --- the Trainer ------------------------------------------------------------------------------------------


class RecordingCollator(NanoVLMCollator):
    def __init__(self, processor):
        super().__init__(processor)
        self.seen = []

    def __call__(self, rows):
        self.seen.append([(row["__index__"], row["__plan__"]["max_image_tokens"]) for row in rows])
        return super().__call__(rows)


def test_trainer_draws_a_budget_per_batch(tmp_path, processor):
    from transformers import TrainingArguments

    from modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMTrainer, tiny_config

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = NanoVLMForConditionalGeneration(tiny_config(
            vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id, shuffle_factors=(2, 4),
            vision=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2),
            text=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)))
        rows = image_rows(8, seed=3)
        collator = RecordingCollator(processor)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        trainer = NanoVLMTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                                 processing_class=processor, image_token_budgets=[64, 16])
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    sampler = trainer.train_batch_sampler
    expected = [[(i, budget) for i in batch] for batch, budget in zip(sampler.batches(0), sampler.batch_budgets(0))]
    assert collator.seen == expected and {budget for batch in expected for _, budget in batch} == {64, 16}
    assert trainer.state.global_step == 4

    with pytest.raises(ValueError, match="pass budgets=... to it"):
        NanoVLMTrainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                       batch_sampler=sampler, image_token_budgets=[64])


def test_model_card_renders_the_budget_table():
    from modeling_nanovlm.model_card import budget_table

    table = budget_table({"64": {"digit_accuracy": 0.9, "quadrant_accuracy": 1.0, "mean_image_tokens": 40.5},
                          "144": {"digit_accuracy": 0.925, "quadrant_accuracy": 0.99, "mean_image_tokens": 88.0}})
    lines = table.splitlines()
    assert lines[0].startswith("| budget") and "digit accuracy" in lines[0] and "mean image tokens" in lines[0]
    assert lines[2] == "| 144 | 92.5 % | 99.0 % | 88.0 |" and lines[3] == "| 64 | 90.0 % | 100.0 % | 40.5 |"


def test_model_card_names_the_connectors_settings():
    from modeling_nanovlm import tiny_config
    from modeling_nanovlm.model_card import render_model_card

    def connector_row(**settings) -> str:
        card = str(render_model_card(tiny_config(**settings), "me/model"))
        return next(line for line in card.splitlines() if line.startswith("| `connector` |"))

    assert connector_row(shuffle_factors=[2, 4], shared_cell_encoder=True, cell_context_kernel=3,
                         token_context_kernel=5, image_token_positions=True) == (
        "| `connector` | shuffle, shuffle factors [2, 4], shared cell encoder, cell context 3x3, token context 5x5, "
        "2-D token positions |")
    assert connector_row(shuffle_factors=[1, 2]) == "| `connector` | shuffle, shuffle factors [1, 2] |"
    assert connector_row(connector="perceiver", perceiver_latents=16) == "| `connector` | perceiver, 16 latents |"


# --- the Perceiver connector sees where each patch is -------------------------------------------------------


def test_perceiver_output_depends_on_where_features_are():
    """Without positions the resampler is blind to the order of its context (the digits task stayed at chance)."""
    from modeling_nanovlm import tiny_config
    from modeling_nanovlm.connector import PerceiverConnector, grid_position_embedding

    torch.manual_seed(0)
    connector = PerceiverConnector(tiny_config(connector="perceiver", perceiver_latents=4, perceiver_depth=1,
                                               perceiver_heads=2, perceiver_head_dim=16)).eval()
    features = torch.randn(1, 6 * 4, 128)
    moved = features[:, torch.randperm(24)]
    with torch.no_grad():
        out, out_moved = connector(features, (6, 4), 1, (1, 4)), connector(moved, (6, 4), 1, (1, 4))
    assert out.shape == (1, 4, 128) and not torch.allclose(out, out_moved, atol=1e-4)
    latents = connector.perceiver.latents
    assert len({tuple(row.tolist()) for row in latents}) == 4  # distinct latents: distinct output tokens
    assert len({tuple(row.tolist()) for row in out[0].round(decimals=4)}) == 4
    embedding = grid_position_embedding(6, 4, 128)
    assert embedding.shape == (24, 128) and len({tuple(row.tolist()) for row in embedding}) == 24


def test_perceiver_pooled_queries_start_from_each_regions_content():
    """With no resampler layer the output is exactly norm(pooled context + latents): latent k reads region k of a
    latents-shaped grid (2 x 3 for 6 latents), so output tokens follow the content of their own region."""
    import torch.nn.functional as F

    from modeling_nanovlm import tiny_config
    from modeling_nanovlm.connector import PerceiverConnector, grid_position_embedding

    torch.manual_seed(0)
    config = tiny_config(connector="perceiver", perceiver_latents=6, perceiver_depth=0, perceiver_pooled_queries=True)
    connector = PerceiverConnector(config).eval()
    features = torch.randn(2, 4 * 9, 128)
    with torch.no_grad():
        out = connector(features, (4, 9), 1, (2, 3))
        context = connector.projection(features + grid_position_embedding(4, 9, 128))
        pooled = F.adaptive_avg_pool2d(context.transpose(1, 2).reshape(2, 128, 4, 9), (2, 3)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(out, connector.perceiver.norm(pooled + connector.perceiver.latents))
        changed = features.clone().view(2, 4, 9, 128)
        changed[:, 2:, 6:] += 5.0  # only the bottom-right region (latent 5) changes
        moved = connector(changed.view(2, 36, 128), (4, 9), 1, (2, 3))
    differs = (moved - out).abs().amax(dim=(0, 2)) > 1e-4
    assert differs.tolist() == [False, False, False, False, False, True]
