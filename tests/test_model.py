"""Core model guarantees: shuffle geometry, RoPE, mixed-shape batches, generation, precision, checkpointing."""

import random

import numpy as np
import pytest
import torch
from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

from modeling_nanovlm import NanoVLMForConditionalGeneration, pixel_shuffle, pixel_unshuffle, tiny_config
from modeling_nanovlm.connector import grid_position_embedding
from processing import NanoVLMImageProcessor, NanoVLMProcessor

from offline_tokenizer import build_tokenizer

PATCH = 16


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return NanoVLMForConditionalGeneration(tiny_config(**overrides)).eval()


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_tokenizer(["Which digit is shown and where? 7 top-left 3 bottom-right"] * 20)
    return NanoVLMProcessor(NanoVLMImageProcessor(max_image_tokens=64), tokenizer)


# --- pixel shuffle ----------------------------------------------------------------------------------


def reference_shuffle(x, grid_height, grid_width, s):
    """Loop version: token (i, j) = concat of patches (i*s + a, j*s + b) for a, b in row-major order."""
    batch, _, dim = x.shape
    grid = x.reshape(batch, grid_height, grid_width, dim)
    rows = []
    for i in range(grid_height // s):
        for j in range(grid_width // s):
            cell = [grid[:, i * s + a, j * s + b] for a in range(s) for b in range(s)]
            rows.append(torch.cat(cell, dim=-1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("grid", [(2, 4), (6, 2), (4, 12), (10, 6), (3, 9)])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_pixel_shuffle_groups_2d_neighbourhoods_and_round_trips(grid, s):
    grid_height, grid_width = grid
    if grid_height % s or grid_width % s:
        pytest.skip("factor does not divide this grid")
    x = torch.randn(2, grid_height * grid_width, 5)
    shuffled = pixel_shuffle(x, grid_height, grid_width, s)
    assert shuffled.shape == (2, grid_height * grid_width // s**2, 5 * s * s)
    assert torch.equal(shuffled, reference_shuffle(x, grid_height, grid_width, s))
    assert torch.equal(pixel_unshuffle(shuffled, grid_height, grid_width, s), x)


def test_pixel_shuffle_rejects_a_factor_that_does_not_divide_the_grid():
    with pytest.raises(ValueError, match="does not divide"):
        pixel_shuffle(torch.randn(1, 6 * 4, 3), 6, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        pixel_shuffle(torch.randn(1, 10, 3), 6, 4, 2)


def test_connector_gives_exact_token_count_for_many_rectangular_sizes():
    model = make_model()
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(40):
            s = rng.choice([1, 2, 4])
            grid_height, grid_width = s * rng.randint(1, 6), s * rng.randint(1, 6)
            features = torch.randn(1, grid_height * grid_width, 128)
            tokens = model.connector(features, (grid_height, grid_width), s, (grid_height // s, grid_width // s))
            assert tokens.shape == (1, grid_height * grid_width // s**2, 128)


def test_any_size_divisible_by_patch_times_s_yields_the_planned_token_count():
    """Through the whole model: (H/p)(W/p)/s^2 features for an H x W image, for many rectangles."""
    model = make_model()
    rng = random.Random(1)
    for _ in range(12):
        s = rng.choice([1, 2, 4])
        height, width = PATCH * s * rng.randint(1, 4), PATCH * s * rng.randint(1, 4)
        budget = (height // PATCH) * (width // PATCH) // s**2
        ip = NanoVLMImageProcessor(max_image_tokens=budget, shuffle_factors=[s])
        batch = ip([random_image(height, width)], return_tensors="pt")
        with torch.no_grad():
            features = model.get_image_features(**batch)
        assert features.shape == (budget, 128)


def test_shared_cell_encoder_merges_the_smallest_factors_encoded_cells():
    """Factor 4 with cells of factor 2: token (i, j) = merge_4(concat of encode(2x2 cell) over its 2x2 cells,
    row-major)."""
    model = make_model(shuffle_factors=(2, 4), shared_cell_encoder=True)
    connector = model.connector
    assert sorted(connector.projections) == ["2", "4"] and connector.cell_size == 2
    features = torch.randn(2, 8 * 12, 128)
    cells = connector.cell_encoder(reference_shuffle(features, 8, 12, 2)).view(2, 4, 6, -1)
    with torch.no_grad():
        by_2 = connector(features, (8, 12), 2, (4, 6))
        by_4 = connector(features, (8, 12), 4, (2, 3))
        torch.testing.assert_close(by_2, connector.projections["2"](cells.flatten(1, 2)))
        for i in range(2):
            for j in range(3):
                merged = torch.cat([cells[:, 2 * i + a, 2 * j + b] for a in range(2) for b in range(2)], dim=-1)
                torch.testing.assert_close(by_4[:, i * 3 + j], connector.projections["4"](merged))
        pooled = connector(features, (8, 12), 4, (1, 2))  # the budget is below factor 4's count: pool, then merge
    assert pooled.shape == (2, 2, 128)


def test_cell_context_adds_a_convolution_over_the_encoded_cells_before_the_merge():
    """With cell_context_kernel=3, factor 2's token (i, j) = merge_2(c + conv(c)) on the grid of encoded cells c, and
    factor 4 merges those context-carrying cells."""
    model = make_model(shuffle_factors=(2, 4), shared_cell_encoder=True, cell_context_kernel=3)
    connector = model.connector
    features = torch.randn(1, 8 * 12, 128)
    with torch.no_grad():
        cells = connector.cell_encoder(reference_shuffle(features, 8, 12, 2))  # (1, 4 * 6, D), row-major cells
        grid = cells.transpose(1, 2).reshape(1, -1, 4, 6)
        expected = cells + torch.nn.functional.conv2d(grid, connector.cell_context.weight, connector.cell_context.bias,
                                                      padding=1).flatten(2).transpose(1, 2)
        torch.testing.assert_close(connector(features, (8, 12), 2, (4, 6)), connector.projections["2"](expected))
        context = expected.view(1, 4, 6, -1)
        merged = torch.cat([context[:, a, b] for a in range(2) for b in range(2)], dim=-1)  # factor 4's token (0, 0)
        torch.testing.assert_close(connector(features, (8, 12), 4, (2, 3))[:, 0], connector.projections["4"](merged))

    without = make_model(shuffle_factors=(2, 4), shared_cell_encoder=True).connector
    assert without.cell_context is None and not any("context" in name for name, _ in without.named_parameters())


def test_token_context_adds_a_convolution_over_each_images_token_grid():
    model = make_model(shuffle_factors=(2, 4), token_context_kernel=3)
    connector = model.connector
    plain = make_model(shuffle_factors=(2, 4)).connector
    plain.load_state_dict({k: v for k, v in connector.state_dict().items() if not k.startswith("token_context")})
    features = torch.randn(2, 8 * 12, 128)
    with torch.no_grad():
        for factor, token_hw in ((2, (4, 6)), (4, (2, 3)), (4, (1, 2))):  # the last one pooled
            tokens = plain(features, (8, 12), factor, token_hw)
            grid = tokens.transpose(1, 2).reshape(2, -1, *token_hw)
            context = torch.nn.functional.conv2d(grid, connector.token_context.weight, connector.token_context.bias,
                                                 padding=1).flatten(2).transpose(1, 2)
            torch.testing.assert_close(connector(features, (8, 12), factor, token_hw), tokens + context)


@pytest.mark.parametrize("cell_kernel, token_kernel", [(3, 0), (0, 3), (3, 3), (5, 0)])
def test_context_kernels_widen_what_a_token_sees_by_their_radius(cell_kernel, token_kernel):
    """At factor 2 (cells = tokens) a patch moves the tokens within (cell_kernel // 2 + token_kernel // 2) of its own
    token, and no others."""
    model = make_model(shuffle_factors=(2, 4), shared_cell_encoder=True, cell_context_kernel=cell_kernel,
                       token_context_kernel=token_kernel)
    features = torch.randn(1, 12 * 12, 128)
    changed = features.clone().view(1, 12, 12, -1)
    changed[0, 5, 5] += 1.0  # a patch of token (2, 2)
    with torch.no_grad():
        moved = model.connector(changed.view(1, 144, -1), (12, 12), 2, (6, 6)) - model.connector(
            features, (12, 12), 2, (6, 6))
    radius = cell_kernel // 2 + token_kernel // 2
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    near = ((rows - 2).abs() <= radius) & ((cols - 2).abs() <= radius)
    assert torch.equal(moved.abs().amax(-1).view(6, 6) > 0, near)


@pytest.mark.parametrize("settings, message", [
    (dict(shared_cell_encoder=True, cell_context_kernel=2), r"cell_context_kernel must be 0 \(none\) or an odd.*got 2"),
    (dict(token_context_kernel=-3), r"token_context_kernel must be 0 \(none\) or an odd.*got -3"),
    (dict(token_context_kernel=2.5), r"token_context_kernel .* got 2.5"),
    (dict(token_context_kernel=None), r"token_context_kernel .* got None"),
    (dict(cell_context_kernel=3), r"cell_context_kernel needs shared_cell_encoder=True"),
])
def test_context_kernels_must_be_odd_and_the_cell_context_needs_the_shared_cell_encoder(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(shuffle_factors=(2, 4), **settings)


@pytest.mark.parametrize("settings, message", [
    (dict(connector="perceiver", image_token_positions=True),
     r"connector='perceiver' ignores the shuffle connector's settings, and these are set: image_token_positions=True;"),
    (dict(connector="perceiver", shuffle_factors=[2, 4], token_context_kernel=3),
     r"shuffle_factors=\[2, 4\], token_context_kernel=3; leave them out"),
    (dict(perceiver_latents=16, perceiver_pooled_queries=True),
     r"connector='shuffle' ignores the perceiver connector's settings.*perceiver_latents=16, perceiver_pooled_queries"),
])
def test_settings_of_the_other_connector_mode_are_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**settings)


@pytest.mark.parametrize("connector", ["shuffle", "perceiver"])
def test_no_split_modules_name_the_layers_this_model_has(connector):
    """FSDP's auto-wrap (accelerate 1.14 raises on a listed class the model lacks) and device maps read this list."""
    settings = dict(connector="perceiver", perceiver_latents=4) if connector == "perceiver" else {}
    model = make_model(**settings)
    present = {type(module).__name__ for module in model.modules()}
    layers = {"DINOv3ViTLayer", "LlamaDecoderLayer"}
    if connector == "perceiver":
        layers.add("Idefics2PerceiverLayer")
    assert layers <= set(model._no_split_modules) <= present
    assert set(model.model._no_split_modules) == set(model._no_split_modules)


def test_image_token_positions_add_a_learned_map_of_each_tokens_place():
    """Each token gets W . e(row, column), e the fixed 2-D sin-cos embedding of its centre relative to the image: the
    same content at two places gives two tokens, and the same place on grids of two resolutions the same addition;
    the Perceiver (whose context carries positions already) has none."""
    model = make_model(shuffle_factors=(2, 4), image_token_positions=True)
    connector = model.connector
    plain = make_model(shuffle_factors=(2, 4)).connector
    plain.load_state_dict({k: v for k, v in connector.state_dict().items() if not k.startswith("token_position")})
    features = torch.randn(1, 1, 128).expand(1, 12 * 12, 128)  # every patch the same: only the place differs
    with torch.no_grad():
        tokens = connector(features[:, :96], (8, 12), 2, (4, 6))
        added = tokens - plain(features[:, :96], (8, 12), 2, (4, 6))
        torch.testing.assert_close(added[0], grid_position_embedding(4, 6, 128) @ connector.token_position.weight.T)
        assert (tokens[0, 0] - tokens[0, 1]).abs().max() > 1e-3
        small, large = (connector(features[:, : h * h], (h, h), 2, (h // 2, h // 2))
                        - plain(features[:, : h * h], (h, h), 2, (h // 2, h // 2)) for h in (4, 12))
    # token (0, 0) of a 2 x 2 grid and token (1, 1) of a 6 x 6 grid both sit at (1/4, 1/4) of their image
    torch.testing.assert_close(small[0, 0], large[0, 1 * 6 + 1])
    assert connector.token_position is not None and plain.token_position is None


def test_shared_cell_encoder_needs_factors_that_are_multiples_of_the_smallest():
    with pytest.raises(ValueError, match=r"multiple of the smallest.*\[2, 3\]"):
        tiny_config(shuffle_factors=(2, 3), shared_cell_encoder=True)
    assert tiny_config(shuffle_factors=(2, 3)).shared_cell_encoder is False  # independent projections: any factors


def test_shared_cell_encoder_survives_save_and_load(tmp_path):
    model = make_model(shuffle_factors=(1, 2, 4), shared_cell_encoder=True, cell_context_kernel=3,
                       token_context_kernel=3, image_token_positions=True)
    ip = NanoVLMImageProcessor.from_model_config(model.config, max_image_tokens=6)
    batch = ip([random_image(128, 96), random_image(64, 64, 1)], return_tensors="pt")
    assert batch["image_shuffle_factor"].tolist() == [4, 2]
    model.save_pretrained(tmp_path)
    loaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.shared_cell_encoder and loaded.config.cell_context_kernel == 3
    assert loaded.config.token_context_kernel == 3
    assert loaded.config.image_token_positions
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_features(**batch), model.get_image_features(**batch))


# --- batching, text-only, generation -----------------------------------------------------------------


CONNECTOR_SETTINGS = {  # the shuffle connector's variants
    "independent projections": {},
    "shared cell encoder": dict(shared_cell_encoder=True),
    "context, positions": dict(shared_cell_encoder=True, cell_context_kernel=3, token_context_kernel=3,
                               image_token_positions=True),
}


@pytest.mark.parametrize("settings", CONNECTOR_SETTINGS.values(), ids=CONNECTOR_SETTINGS.keys())
def test_image_features_do_not_depend_on_the_batch(processor, settings):
    model = make_model(**settings)
    images = [random_image(96, 160, 1), random_image(200, 64, 2), random_image(96, 160, 3), random_image(300, 300, 4)]
    ip = processor.image_processor
    with torch.no_grad():
        together = model.get_image_features(**ip(images, return_tensors="pt"))
        alone = [model.get_image_features(**ip([image], return_tensors="pt")) for image in images]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_patches_reach_the_tower_as_the_whole_image_would(processor):
    """The processor's patch rows, embedded as they arrive (`PatchEmbeddingConv`), give what the whole image gives
    through DINOv3's own conv: the same image features and the same logits, to float rounding. The reference never
    touches the patch layout: it normalises the image itself."""
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id)
    image = random_image(96, 160)  # sides already multiples of 16 x s: the plan keeps this size, no resize
    batch = processor(text=["<image>Which digit is shown?"], images=[image], return_tensors="pt")
    assert batch["image_grid_hw"].tolist() == [[6, 10]]
    ip = processor.image_processor
    mean, std = (torch.tensor(values)[:, None, None] for values in (ip.image_mean, ip.image_std))
    whole = ((torch.from_numpy(image).permute(2, 0, 1).double() / 255 - mean) / std).float()[None]
    factor, token_hw = int(batch["image_shuffle_factor"][0]), tuple(batch["image_token_hw"][0].tolist())
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=whole).last_hidden_state[:, model.model.num_prefix_tokens :]
        expected = model.connector(hidden, (6, 10), factor, token_hw)[0]
        torch.testing.assert_close(model.get_image_features(**{k: batch[k] for k in ip.model_input_names}), expected)
        embeds = model.get_input_embeddings()(batch["input_ids"])
        embeds = model.model.merge_image_features(batch["input_ids"] == processor.image_token_id, embeds, expected)
        reference = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(model(**batch).logits, reference)


def test_patches_that_do_not_fit_the_tower_are_a_clear_error(processor):
    model = make_model()
    batch = NanoVLMImageProcessor(patch_size=8, max_image_tokens=64)([random_image(64, 64)], return_tensors="pt")
    with pytest.raises(ValueError, match="3 x 16 x 16 values.*patch_size"):
        model.get_image_features(**batch)


def test_text_only_input_matches_the_bare_language_model(processor):
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id)
    batch = processor(text=["Which digit is shown?", "where"], return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).logits
        hidden = model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        bare = model.lm_head(hidden.last_hidden_state)
    assert torch.equal(ours, bare)


@pytest.mark.parametrize("settings", CONNECTOR_SETTINGS.values(), ids=CONNECTOR_SETTINGS.keys())
def test_every_parameter_gets_a_gradient_whatever_the_batch_uses(processor, settings):
    # FSDP / ZeRO reduce every gradient on every process: a shuffle factor absent from one process's batch, or the
    # tower in a text-only batch, must still get a (zero) gradient, and the loss must not change because of it.
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id,
                       **settings).train()
    batches = {
        "factor 2 only": processor(text=["<image>which?"], images=[random_image(160, 160)], return_tensors="pt"),
        "text only": processor(text=["which digit?"], return_tensors="pt"),
    }
    for name, batch in batches.items():
        model.zero_grad(set_to_none=True)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        missing = [key for key, parameter in model.named_parameters() if parameter.grad is None]
        missing.remove("model.vision_tower.embeddings.mask_token")  # DINOv3's masked-image-modelling token: never used
        assert not missing, f"{name}: no gradient for {missing[:5]}"
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(**batch, labels=batch["input_ids"]).loss, loss.detach())
        model.train()
    assert set(batches["factor 2 only"]["image_shuffle_factor"].tolist()) == {2}
    for unused in model.connector.projections["4"].parameters():
        assert unused.grad is not None and not unused.grad.any()


def test_loss_counts_only_labelled_positions(processor):
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id)
    batch = processor(text=["<image>Which digit is shown?"], images=[random_image(64, 96)], return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    with torch.no_grad():
        out = model(**batch, labels=labels)
    logits = out.logits[0, -4:-1]
    expected = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, -3:])
    torch.testing.assert_close(out.loss, expected)


def test_cached_and_uncached_greedy_generation_agree(processor):
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id)
    batch = processor(
        text=["<image>Which digit is shown and where?", "Where? <image>"],
        images=[random_image(80, 150, 5), random_image(130, 70, 6)],
        return_tensors="pt",
    )
    cached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached)


def test_generate_sends_pixels_only_at_prefill(processor):
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id)
    batch = processor(text=["<image>Which digit?"], images=[random_image(64, 64)], return_tensors="pt")
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    model.generate(**batch, max_new_tokens=5, do_sample=False)
    hook.remove()
    assert len(calls) == 1


def test_image_token_count_mismatch_names_both_counts(processor):
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id)
    batch = processor(text=["<image>Which digit?"], images=[random_image(64, 64)], return_tensors="pt")
    n = int((batch["input_ids"] == processor.image_token_id).sum())
    batch["input_ids"] = batch["input_ids"][:, 1:]  # drop one image token
    with pytest.raises(ValueError, match=f"{n - 1} image tokens.*{n} image features"):
        model(**batch)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"])


# --- RoPE ---------------------------------------------------------------------------------------------


def first_layer_logits(model, pixels):
    """Attention logits q.k of the tower's first layer (patches only), as the layer computes them."""
    tower = model.vision_tower
    hidden = tower.embeddings(pixels)
    cos, sin = tower.rope_embeddings(pixels)
    layer = tower.model.layer[0]
    attention = layer.attention
    normed = layer.norm1(hidden)
    heads = lambda t: t.view(1, -1, attention.num_heads, attention.head_dim).transpose(1, 2)  # noqa: E731
    q, k = apply_rotary_pos_emb(heads(attention.q_proj(normed)), heads(attention.k_proj(normed)), cos, sin)
    prefix = model.model.num_prefix_tokens
    return (q[..., prefix:, :] @ k[..., prefix:, :].transpose(-1, -2))[0]


def test_rope_attention_logits_depend_on_where_the_content_is():
    model = make_model()
    grid = 6
    rng = torch.Generator().manual_seed(0)
    patch_a, patch_b = torch.randn(3, PATCH, PATCH, generator=rng), torch.randn(3, PATCH, PATCH, generator=rng)

    def place(pos_a, pos_b):
        pixels = torch.zeros(1, 3, grid * PATCH, grid * PATCH)
        for patch, (row, col) in ((patch_a, pos_a), (patch_b, pos_b)):
            pixels[0, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = patch
        return pixels

    def logit(pos_a, pos_b):
        with torch.no_grad():
            logits = first_layer_logits(model, place(pos_a, pos_b))
        return logits[:, pos_a[0] * grid + pos_a[1], pos_b[0] * grid + pos_b[1]]

    near = logit((1, 1), (1, 2))
    far = logit((1, 1), (4, 5))
    assert (near - far).abs().max() > 1e-3  # moving the content to another offset changes the logit
    # RoPE is relative: the same offset elsewhere gives the same logit (patch contents only, zeros around)
    torch.testing.assert_close(logit((1, 1), (1, 2)), logit((3, 2), (3, 3)), rtol=1e-4, atol=1e-4)


def reference_cos_sin(rope, grid_height, grid_width):
    ys = (torch.arange(grid_height, dtype=torch.float64) + 0.5) / grid_height * 2 - 1
    xs = (torch.arange(grid_width, dtype=torch.float64) + 0.5) / grid_width * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    inv_freq = 1 / rope.base ** torch.arange(0, 1, 4 / rope.head_dim, dtype=torch.float64)
    angles = (2 * torch.pi * coords[:, :, None] * inv_freq).flatten(1).tile(2)
    return angles.cos(), angles.sin()


def test_vision_rope_is_float32_even_in_bf16_models_and_under_autocast():
    model = make_model().to(torch.bfloat16)
    rope = model.vision_tower.rope_embeddings
    cos, sin = rope.float32_cos_sin(37, 53, "cpu")
    assert cos.dtype == torch.float32
    ref_cos, ref_sin = reference_cos_sin(rope, 37, 53)
    assert (cos.double() - ref_cos).abs().max() < 1e-5 and (sin.double() - ref_sin).abs().max() < 1e-5
    # What stock transformers does with the cast buffer is measurably worse:
    stock_freq = rope.inv_freq.to(torch.float32)
    assert rope.inv_freq.dtype == torch.bfloat16 and not torch.equal(stock_freq, rope.angles_inv_freq("cpu"))
    # Cast to the q/k dtype only when handed to attention:
    pixels = torch.zeros(1, 3, 37 * PATCH, 53 * PATCH, dtype=torch.bfloat16)
    applied_cos, _ = rope(pixels)
    assert applied_cos.dtype == torch.bfloat16 and torch.equal(applied_cos, ref_cos.to(torch.bfloat16))
    fp32_model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_cos, _ = fp32_model.vision_tower.rope_embeddings(pixels.float())
    assert autocast_cos.dtype == torch.bfloat16 and torch.equal(autocast_cos, ref_cos.to(torch.bfloat16))


def test_language_model_rope_frequencies_stay_float32_after_a_bf16_cast():
    model = make_model()
    rotary = model.language_model.rotary_emb
    before = rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, before)
    assert model.language_model.embed_tokens.weight.dtype == torch.bfloat16


def test_rope_augmentation_is_off_by_default_and_can_be_turned_on():
    pixels = torch.randn(1, 3, 4 * PATCH, 6 * PATCH)
    plain = make_model().train()
    assert torch.equal(plain.vision_tower.rope_embeddings(pixels)[0], plain.vision_tower.rope_embeddings(pixels)[0])
    augmented = make_model(vision_rope_augmentation=True).train()
    rope = augmented.vision_tower.rope_embeddings
    assert not torch.equal(rope(pixels)[0], rope(pixels)[0])
    augmented.eval()
    assert torch.equal(rope(pixels)[0], rope(pixels)[0])


# --- precision and activation checkpointing --------------------------------------------------------


def train_step(model, batch, labels, autocast=False, checkpointing=False):
    model.train()
    model.zero_grad()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch, labels=labels).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


@pytest.mark.filterwarnings("error::FutureWarning")
def test_activation_checkpointing_reaches_tower_and_lm(processor):
    model = make_model()
    model.activation_checkpointing_enable()
    flags = {
        name.split(".")[1]  # model.<part>...
        for name, module in model.named_modules()
        if getattr(module, "gradient_checkpointing", False)
    }
    assert {"vision_tower", "language_model"} <= flags


@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("long_side", [1024, 2048])
def test_bf16_autocast_checkpointed_step_matches_fp32(processor, long_side):
    """A long-side-1024/2048 image (2048 x 512 etc.): finite loss, gradients close to the fp32 plain step."""
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id)
    image = random_image(long_side, long_side // 4, 7)
    batch = processor(
        text=["<image>Which digit is shown and where?"], images=[image], return_tensors="pt", max_image_tokens=256
    )
    labels = batch["input_ids"].clone()
    labels[labels == processor.image_token_id] = -100
    ref_loss, ref_grads = train_step(model, batch, labels)
    loss, grads = train_step(model, batch, labels, autocast=True, checkpointing=True)
    assert torch.isfinite(loss) and torch.isfinite(grads).all()
    assert abs(loss - ref_loss) < 0.05 * abs(ref_loss)
    cosine = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0)
    assert cosine > 0.99, cosine
    # checkpointing alone (fp32) changes nothing but memory
    _, fp32_ckpt_grads = train_step(model, batch, labels, checkpointing=True)
    torch.testing.assert_close(fp32_ckpt_grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("long_side", [1024, 2048])
def test_bf16_autocast_checkpointed_step_on_cuda(processor, long_side):
    model = make_model(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id).cuda()
    batch = processor(
        text=["<image>Which digit?"], images=[random_image(long_side, long_side)], return_tensors="pt",
        max_image_tokens=1024,
    ).to("cuda")
    labels = batch["input_ids"].clone()
    labels[labels == processor.image_token_id] = -100
    model.train()
    model.zero_grad()
    ref = model(**batch, labels=labels).loss
    ref.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    model.activation_checkpointing_enable()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, labels=labels).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.isfinite(loss)
    assert torch.nn.functional.cosine_similarity(grads.float(), ref_grads.float(), dim=0) > 0.99
