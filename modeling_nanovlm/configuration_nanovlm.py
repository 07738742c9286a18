"""Configuration of nanoVLM: a DINOv3 vision tower, a connector, and a Llama-family language model."""

from transformers.utils.versions import require_version

# Hub users run this file as remote code under whatever transformers they have: name the release it needs before an
# import or attribute that an older one lacks fails obscurely. setup.cfg states the same range (tests/test_versions.py).
TRANSFORMERS_REQUIREMENT = "transformers>=5.24,<6"
require_version(TRANSFORMERS_REQUIREMENT, f"nanoVLM's model code needs it: pip install '{TRANSFORMERS_REQUIREMENT}'")

from transformers import AutoConfig, PreTrainedConfig  # noqa: E402
from transformers.configuration_utils import SubConfigSpec  # noqa: E402

CONNECTOR_MODES = ("shuffle", "perceiver")
# The settings each connector mode reads; the other mode's must keep their defaults (a model that silently ignores a
# setting is a surprise later).
CONNECTOR_SETTINGS = {
    "shuffle": ("shuffle_factors", "shared_cell_encoder", "cell_context_kernel", "token_context_kernel",
                "image_token_positions"),
    "perceiver": ("perceiver_latents", "perceiver_depth", "perceiver_heads", "perceiver_head_dim",
                  "perceiver_pooled_queries"),
}


class NanoVLMConfig(PreTrainedConfig):
    r"""
    vision_config (`DINOv3ViTConfig` or `dict`): the vision tower (any H x W, 2-D RoPE).
    text_config (`LlamaConfig` or `dict`): the causal language model (any Llama-family config).
    image_token_id (`int`): id of the `<image>` token whose positions receive image features.
    connector (`str`): "shuffle" (pixel shuffle by a per-image factor, average pooling when even the
        largest factor exceeds the budget, then a projection per factor) or "perceiver" (a fixed number
        of latents per image through transformers' Idefics2 Perceiver resampler).
        `shared_cell_encoder`, `cell_context_kernel`, `token_context_kernel` and `image_token_positions` are
        shuffle-connector settings.
    shuffle_factors (`list[int]`): allowed pixel-shuffle factors, one projection each.
    shared_cell_encoder (`bool`): every factor reads the smallest factor's s0 x s0 patch cells through one shared
        encoder layer, and factor s merges its (s/s0)^2 encoded cells with its own linear layer, so the larger
        factors reuse what the smallest learns (instead of one independent two-layer projection per factor).
        Needs every factor to be a multiple of the smallest. What it is worth for one model serving many budgets:
        docs/recipe.md.
    cell_context_kernel (`int`): with `shared_cell_encoder`, the side (odd) of a convolution over the grid of
        encoded cells whose output is added to each cell, so every token also carries its neighbourhood (the
        locality-keeping idea of Honeybee's C-Abstractor and MobileVLM's LDP): what token borders cut, and what a
        larger factor merges, stays readable. 0: none.
    token_context_kernel (`int`): the side (odd) of a convolution over each image's grid of output tokens whose
        output is added to each token: every token also carries its neighbouring tokens. 0: none.
    image_token_positions (`bool`): add a learned map of each image token's 2-D place in the image (a fixed sin-cos
        embedding of its centre, relative to the image) to the token. The LM's positions are 1-D, so without it a
        token's row and column depend on the token grid's width, which changes with the image and the budget.
    perceiver_latents / perceiver_depth / perceiver_heads / perceiver_head_dim: Perceiver settings.
    perceiver_pooled_queries (`bool`): each latent's query starts as the image's context average-pooled to a
        latents-sized grid (plus the learned latent), so every output token begins with its own region's content
        and cross-attention adds detail. Without it (Idefics2's way) the queries are the learned latents alone
        (docs/recipe.md compares the two).
    vision_rope_augmentation (`bool`): apply DINOv3's random RoPE shift/jitter/rescale in train mode
        (off by default: `pos_embed_rescale=2.0` makes train-mode features random).
    projector_hidden_act (`str`): activation of the two-layer projection MLP.
    image_mean / image_std (`list[float]`): the image processor's normalisation (ImageNet's, as DINOv3 uses);
        the model applies it to uint8 `pixel_values` (the processor's `pixel_dtype="uint8"`).

    The config is the one source of the settings the weights fix (the tower's `patch_size`, `connector`,
    `shuffle_factors`, `perceiver_latents`, `image_mean` / `image_std`): build the image processor from it rather
    than repeating them.

        config = NanoVLMConfig(vision_config=DINOv3ViTConfig(), text_config=LlamaConfig(), shuffle_factors=[2, 4])
        model = NanoVLMForConditionalGeneration(config)
        image_processor = NanoVLMImageProcessor.from_model_config(config, max_image_tokens=256)
    """

    model_type = "nanovlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov3_vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 0
    connector: str = "shuffle"
    shuffle_factors: list[int] | tuple[int, ...] = (1, 2, 4)
    shared_cell_encoder: bool = False
    perceiver_latents: int = 64
    perceiver_depth: int = 3
    perceiver_heads: int = 8
    perceiver_head_dim: int = 64
    perceiver_pooled_queries: bool = False
    cell_context_kernel: int = 0
    token_context_kernel: int = 0
    image_token_positions: bool = False
    vision_rope_augmentation: bool = False
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False
    image_mean: list[float] | tuple[float, ...] | None = (0.485, 0.456, 0.406)
    image_std: list[float] | tuple[float, ...] | None = (0.229, 0.224, 0.225)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The same rules and messages as the image processor's `check_plan_settings` (this package cannot import
        # processing; tests/test_plan.py holds the two to the same answers).
        if self.connector not in CONNECTOR_MODES:
            raise ValueError(f"connector must be one of {CONNECTOR_MODES}, got {self.connector!r}")
        if not self.shuffle_factors or any(int(s) != s or s < 1 for s in self.shuffle_factors):
            raise ValueError(f"shuffle_factors must be positive integers, got {self.shuffle_factors!r}")
        self.shuffle_factors = sorted(int(s) for s in self.shuffle_factors)
        if self.shared_cell_encoder and any(s % self.shuffle_factors[0] for s in self.shuffle_factors):
            raise ValueError(
                "shared_cell_encoder needs every shuffle factor to be a multiple of the smallest (its cells are "
                f"the smallest factor's), got {self.shuffle_factors}"
            )
        for name in ("cell_context_kernel", "token_context_kernel"):
            kernel = getattr(self, name)
            odd_side = isinstance(kernel, (int, float)) and int(kernel) == kernel and kernel > 0 and kernel % 2 == 1
            if kernel != 0 and not odd_side:
                raise ValueError(
                    f"{name} must be 0 (none) or an odd kernel side (the convolution keeps its grid's size), "
                    f"got {kernel!r}"
                )
            setattr(self, name, int(kernel))
        if self.cell_context_kernel and not self.shared_cell_encoder:
            raise ValueError(
                "cell_context_kernel needs shared_cell_encoder=True: its convolution runs over the encoded cells"
            )
        for mode, settings in CONNECTOR_SETTINGS.items():
            changed = [name for name in settings if mode != self.connector and self._differs_from_default(name)]
            if changed:
                raise ValueError(
                    f"connector={self.connector!r} ignores the {mode} connector's settings, and these are set: "
                    + ", ".join(f"{name}={getattr(self, name)!r}" for name in changed) + "; leave them out"
                )
        # The LM's own tie setting decides; keep it visible on the composite config.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    def _differs_from_default(self, name: str) -> bool:
        default = type(self).__dataclass_fields__[name].default
        value = getattr(self, name)
        return list(value) != list(default) if isinstance(default, (list, tuple)) else value != default

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)


def _preset(vision: dict, text: dict, image_token_id: int, overrides: dict) -> NanoVLMConfig:
    """A config from preset sub-config fields; `vision={...}` / `text={...}` override single fields."""
    vision = {"model_type": "dinov3_vit", **vision, **overrides.pop("vision", {})}
    text = {"model_type": "llama", **text, **overrides.pop("text", {})}
    return NanoVLMConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, **overrides)


def tiny_config(vocab_size: int = 320, image_token_id: int = 3, **overrides) -> NanoVLMConfig:
    """A ~1M-parameter model for tests and the built-in digits task (random weights, CPU friendly)."""
    vision = dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
        num_register_tokens=4, layerscale_value=1.0,
    )
    text = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    return _preset(vision, text, image_token_id, overrides)


def small_config(vocab_size: int = 49153, image_token_id: int = 49152, **overrides) -> NanoVLMConfig:
    """Shapes of DINOv3 ViT-S/16 (facebook/dinov3-vits16-pretrain-lvd1689m) + SmolLM2-135M."""
    vision = dict(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, patch_size=16,
        num_register_tokens=4, layerscale_value=1.0,
    )
    text = dict(
        vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=0, eos_token_id=0,
    )
    return _preset(vision, text, image_token_id, overrides)


__all__ = ["NanoVLMConfig", "CONNECTOR_SETTINGS", "tiny_config", "small_config"]
