"""nanoVLM: DINOv3 vision tower -> connector -> Llama-family language model.

Images arrive flattened to patches with a per-image grid (see `NanoVLMImageProcessor`), so no image
is ever padded: the tower runs once per distinct image shape in the batch, and the connector turns
each image's patch grid into exactly the number of tokens its plan says.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from huggingface_hub import HfApi
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTRopePositionEmbedding,
    augment_patches_center_coordinates,
    get_patches_center_coordinates,
)
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

from .configuration_nanovlm import NanoVLMConfig
from .model_card import render_model_card

IMAGE_TOKEN = "<image>"
PLAN_INPUTS = ("image_grid_hw", "image_token_hw", "image_shuffle_factor")


def pixel_shuffle(x: torch.Tensor, grid_height: int, grid_width: int, factor: int) -> torch.Tensor:
    """Space-to-depth on a rectangular grid: (B, Gh*Gw, D) -> (B, Gh*Gw/s^2, D*s^2).

    Each output token holds one s x s neighbourhood of the (Gh, Gw) grid, in row-major order.
    """
    batch, length, dim = x.shape
    if length != grid_height * grid_width:
        raise ValueError(f"pixel_shuffle: {length} tokens do not form a {grid_height}x{grid_width} grid")
    if grid_height % factor or grid_width % factor:
        raise ValueError(f"pixel_shuffle: factor {factor} does not divide the {grid_height}x{grid_width} grid")
    x = x.reshape(batch, grid_height // factor, factor, grid_width // factor, factor, dim)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (grid_height // factor) * (grid_width // factor), factor * factor * dim)


def pixel_unshuffle(x: torch.Tensor, grid_height: int, grid_width: int, factor: int) -> torch.Tensor:
    """Inverse of `pixel_shuffle`: (B, Gh*Gw/s^2, D*s^2) -> (B, Gh*Gw, D), for the original (Gh, Gw) grid."""
    batch, length, dim = x.shape
    rows, cols = grid_height // factor, grid_width // factor
    if grid_height % factor or grid_width % factor or length != rows * cols or dim % (factor * factor):
        raise ValueError(f"pixel_unshuffle: ({length}, {dim}) is not a {grid_height}x{grid_width} grid shuffled by {factor}")
    x = x.reshape(batch, rows, cols, factor, factor, dim // (factor * factor))
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid_height * grid_width, dim // (factor * factor))


def grid_position_embedding(grid_height: int, grid_width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(Gh*Gw, dim) fixed 2-D sin-cos embedding of each patch's centre, in coordinates relative to the image (0-1).

    The Perceiver resampler attends to its context by content only, and the tower's RoPE encodes relative positions
    only, so without this the latents cannot tell where in the image a feature is. Relative coordinates make it the
    same for every resolution; half the channels encode the row, half the column, at geometric frequencies.
    """
    quarter = dim // 4
    frequencies = math.pi * 2.0 ** torch.linspace(0.0, 5.0, quarter, device=device, dtype=torch.float32)
    rows = (torch.arange(grid_height, device=device, dtype=torch.float32) + 0.5) / grid_height
    cols = (torch.arange(grid_width, device=device, dtype=torch.float32) + 0.5) / grid_width
    row_angles = rows[:, None, None] * frequencies  # (Gh, 1, quarter)
    col_angles = cols[None, :, None] * frequencies  # (1, Gw, quarter)
    parts = [row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()]
    parts = [part.expand(grid_height, grid_width, quarter) for part in parts]
    embedding = torch.cat(parts, dim=-1).reshape(grid_height * grid_width, 4 * quarter)
    embedding = F.pad(embedding, (0, dim - 4 * quarter))
    return embedding.to(dtype) if dtype is not None else embedding


class Float32VisionRope(DINOv3ViTRopePositionEmbedding):
    """DINOv3's 2-D RoPE with cos/sin always computed in float32.

    transformers computes the angles from the `inv_freq` buffer, which `model.to(torch.bfloat16)` casts,
    and under autocast the result would follow it. Here `inv_freq` is rebuilt in float32 for every call,
    autocast is off while computing, and the result is cast to the dtype q/k have when it is applied.
    The random coordinate augmentation runs only when `augment` is on (and in train mode).
    """

    def __init__(self, config, augment: bool = False):
        super().__init__(config)
        self.augment = augment

    def angles_inv_freq(self, device) -> torch.Tensor:
        return 1 / self.base ** torch.arange(0, 1, 4 / self.head_dim, dtype=torch.float32, device=device)

    def float32_cos_sin(self, grid_height: int, grid_width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            coords = get_patches_center_coordinates(grid_height, grid_width, dtype=torch.float32, device=device)
            if self.augment and self.training:
                coords = augment_patches_center_coordinates(
                    coords,
                    shift=self.config.pos_embed_shift,
                    jitter=self.config.pos_embed_jitter,
                    rescale=self.config.pos_embed_rescale,
                )
            angles = 2 * math.pi * coords[:, :, None] * self.angles_inv_freq(device)[None, None, :]
            angles = angles.flatten(1, 2).tile(2)
            return torch.cos(angles), torch.sin(angles)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch = self.config.patch_size
        grid_height, grid_width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        cos, sin = self.float32_cos_sin(grid_height, grid_width, pixel_values.device)
        device_type = pixel_values.device.type
        if torch.is_autocast_enabled(device_type):
            qk_dtype = torch.get_autocast_dtype(device_type)
        else:
            qk_dtype = pixel_values.dtype  # the tower casts pixels to its weight dtype first
        return cos.to(qk_dtype), sin.to(qk_dtype)


class ProjectionMLP(nn.Module):
    def __init__(self, in_features: int, out_features: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class NanoVLMConnector(nn.Module):
    """Patch features of one image shape -> LM-width image tokens, as the plan says.

    shuffle: (optional average pooling of the patch grid) -> pixel shuffle by s -> projection for s.
    perceiver: projection -> Idefics2 Perceiver resampler (a fixed number of latents per image).
    """

    def __init__(self, config: NanoVLMConfig):
        super().__init__()
        self.mode = config.connector
        vision_dim = config.vision_config.hidden_size
        text_dim = config.text_config.hidden_size
        act = config.projector_hidden_act
        if self.mode == "shuffle":
            self.projections = nn.ModuleDict(
                {str(s): ProjectionMLP(vision_dim * s * s, text_dim, act) for s in config.shuffle_factors}
            )
        else:
            self.projection = ProjectionMLP(vision_dim, text_dim, act)
            self.perceiver = Idefics2PerceiverResampler(
                Idefics2PerceiverConfig(
                    hidden_size=text_dim,
                    hidden_act="silu",
                    rms_norm_eps=getattr(config.text_config, "rms_norm_eps", 1e-6),
                    resampler_n_latents=config.perceiver_latents,
                    resampler_depth=config.perceiver_depth,
                    resampler_n_heads=config.perceiver_heads,
                    resampler_head_dim=config.perceiver_head_dim,
                    num_key_value_heads=config.perceiver_heads,
                    attn_implementation=config.text_config._attn_implementation,
                )
            )
            # Idefics2 creates every latent as ones: identical queries give identical output tokens, and on the
            # digits task the model learned only what one token carries (the quadrant, not the digit). Distinct
            # random latents break that symmetry; small ones (queries are RMS-normalised, so their scale does not
            # matter there) keep the constant latent out of the output's residual, leaving the image's content.
            nn.init.normal_(self.perceiver.latents, std=getattr(config, "initializer_range", 0.02))

    def forward(self, features: torch.Tensor, grid_hw: tuple[int, int], factor: int, token_hw: tuple[int, int]):
        """features: (B, Gh*Gw, D) for B images of one plan -> (B, th*tw, text_dim)."""
        if self.mode == "perceiver":
            if factor != 1 or token_hw[0] * token_hw[1] != self.perceiver.n_latents:
                raise ValueError(
                    f"the image processor planned {token_hw[0] * token_hw[1]} tokens (shuffle factor {factor}) but "
                    f"this model's Perceiver gives {self.perceiver.n_latents} per image: use a processor with "
                    f"connector='perceiver' and perceiver_latents={self.perceiver.n_latents}"
                )
            position = grid_position_embedding(*grid_hw, features.shape[-1], features.device, features.dtype)
            context = self.projection(features + position)
            mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
            return self.perceiver(context, attention_mask=mask)
        if str(factor) not in self.projections:
            raise ValueError(
                f"the image processor planned shuffle factor {factor}, but this model only has projections for "
                f"{sorted(int(s) for s in self.projections)}: use processor and model with the same shuffle_factors"
            )
        grid_height, grid_width = grid_hw
        pooled_height, pooled_width = token_hw[0] * factor, token_hw[1] * factor
        if not (0 < pooled_height <= grid_height and 0 < pooled_width <= grid_width):
            raise ValueError(
                f"token grid {tuple(token_hw)} x shuffle factor {factor} does not fit the {grid_height}x{grid_width} "
                "patch grid: image_token_hw and image_shuffle_factor must come from the processor's plan"
            )
        if (pooled_height, pooled_width) != (grid_height, grid_width):
            if factor != max(int(s) for s in self.projections):
                raise ValueError(
                    f"the image processor pools at shuffle factor {factor}, which only happens when its factors "
                    f"or connector mode differ from this model's (shuffle, {sorted(int(s) for s in self.projections)})"
                )
            grid = features.transpose(1, 2).reshape(features.shape[0], -1, grid_height, grid_width)
            grid = F.adaptive_avg_pool2d(grid, (pooled_height, pooled_width))
            features = grid.flatten(2).transpose(1, 2)
        tokens = pixel_shuffle(features, pooled_height, pooled_width, factor)
        return self.projections[str(factor)](tokens)


class NanoVLMPreTrainedModel(PreTrainedModel):
    config: NanoVLMConfig
    config_class = NanoVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["DINOv3ViTLayer", "LlamaDecoderLayer", "Idefics2PerceiverLayer"]
    _skip_keys_device_placement = "cache"


class NanoVLMForConditionalGeneration(NanoVLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: NanoVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower.rope_embeddings = Float32VisionRope(
            config.vision_config, augment=config.vision_rope_augmentation
        )
        self.connector = NanoVLMConnector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.num_prefix_tokens = 1 + config.vision_config.num_register_tokens  # CLS + registers, dropped
        # FSDP wraps these; the Perceiver's layers exist only with that connector.
        self._no_split_modules = ["DINOv3ViTLayer", "LlamaDecoderLayer"] + (
            ["Idefics2PerceiverLayer"] if config.connector == "perceiver" else []
        )
        self.post_init()

    # --- construction from pretrained parts -------------------------------------------------------

    @classmethod
    def from_backbones(cls, vision_model: str, text_model: str, tokenizer=None, **config_kwargs):
        """A model from a pretrained DINOv3 tower and a pretrained Llama-family LM (Hub ids or folders).

        The `<image>` token is added to the LM's tokenizer (or to `tokenizer`, if given) and the embeddings
        are resized to match; the connector starts from random weights.
        """
        vision = AutoModel.from_pretrained(vision_model)
        language = AutoModelForCausalLM.from_pretrained(text_model)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(text_model)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if len(tokenizer) > language.get_input_embeddings().num_embeddings:
            language.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        # Base LMs end on <|endoftext|>; a chat turn ends on <|im_end|>, so generation stops on either.
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
        eos = language.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if end_of_turn is not None and end_of_turn not in eos:
            language.generation_config.eos_token_id = eos + [end_of_turn]
        config = NanoVLMConfig(
            vision_config=vision.config.to_dict(),
            text_config=language.config.to_dict(),
            image_token_id=image_token_id,
            **config_kwargs,
        )
        model = cls(config)
        model.vision_tower.load_state_dict(vision.state_dict())
        model.language_model.load_state_dict(language.state_dict())
        model.generation_config = language.generation_config
        model.config.base_models = [vision_model, text_model]
        return model

    def save_pretrained(self, save_directory, *args, processor=None, metrics=None, **kwargs):
        """Weights, config and remote code (transformers), plus a model card; `processor` is saved alongside."""
        # transformers records one auto class per model class; the saved config maps AutoModel too.
        if self._auto_class is not None:
            target = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": target}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if processor is not None:
            processor.save_pretrained(save_directory)
        self._write_model_card(save_directory, Path(save_directory).name, processor, metrics)
        return result

    def _write_model_card(self, folder, repo, processor, metrics):
        image_processor = getattr(processor, "image_processor", None)
        render_model_card(self.config, repo, image_processor, metrics).save(Path(folder) / "README.md")

    def push_to_hub(
        self, repo_id: str, *, processor=None, metrics=None, commit_message=None, private=None, token=None,
        revision=None, create_pr=False, max_shard_size="50GB", **kwargs,
    ):
        """Upload weights, config, remote code, model card (and `processor`, if given) in one commit."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, processor=processor, metrics=metrics, max_shard_size=max_shard_size)
            self._write_model_card(folder, repo_id, processor, metrics)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload nanoVLM model",
                revision=revision,
                create_pr=create_pr,
            )

    # --- embeddings -------------------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` casts every float buffer, the LM's RoPE inverse frequencies included,
        # which costs the rotary angles their precision. Rebuild them in float32 after any cast.
        super()._apply(fn, recurse)
        for module in self.language_model.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor) and inv_freq.dtype != torch.float32 and inv_freq.device.type != "meta":
                init_fn = {"default": getattr(module, "compute_default_rope_parameters", None), **ROPE_INIT_FUNCTIONS}
                fresh, _ = init_fn[module.rope_type](module.config)
                module.inv_freq = fresh.to(device=inv_freq.device, dtype=torch.float32)
                module.original_inv_freq = module.inv_freq.clone()
        return self

    # --- images -----------------------------------------------------------------------------------

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_hw: torch.Tensor,
        image_token_hw: torch.Tensor,
        image_shuffle_factor: torch.Tensor,
    ) -> torch.Tensor:
        """(total image tokens, text hidden) features, image after image in input order."""
        if image_grid_hw is None or image_token_hw is None or image_shuffle_factor is None:
            raise ValueError(
                "pixel_values need their plan: pass image_grid_hw, image_token_hw and image_shuffle_factor "
                "as the processor returns them"
            )
        patch = self.config.patch_size
        grids = image_grid_hw.tolist()
        token_grids = image_token_hw.tolist()
        factors = image_shuffle_factor.tolist()
        patch_counts = [h * w for h, w in grids]
        if sum(patch_counts) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} patches but image_grid_hw describes {sum(patch_counts)}"
            )
        images = pixel_values.split(patch_counts)
        by_shape = defaultdict(list)
        for index, grid in enumerate(grids):
            by_shape[tuple(grid)].append(index)

        features = [None] * len(grids)
        for (grid_height, grid_width), indices in by_shape.items():
            pixels = torch.stack([images[i] for i in indices])
            pixels = pixels.view(len(indices), grid_height, grid_width, 3, patch, patch)
            pixels = pixels.permute(0, 3, 1, 4, 2, 5).reshape(len(indices), 3, grid_height * patch, grid_width * patch)
            hidden = self.vision_tower(pixel_values=pixels).last_hidden_state[:, self.num_prefix_tokens :]
            by_plan = defaultdict(list)
            for row, index in enumerate(indices):
                by_plan[(factors[index], tuple(token_grids[index]))].append(row)
            for (factor, token_hw), rows in by_plan.items():
                tokens = self.connector(hidden[rows], (grid_height, grid_width), factor, token_hw)
                for row, image_tokens in zip(rows, tokens):
                    features[indices[row]] = image_tokens
        return torch.cat(features)

    def merge_image_features(self, input_ids, inputs_embeds, image_features):
        """Place image features at the `<image>` positions; the counts must agree exactly."""
        image_mask = input_ids == self.config.image_token_id
        num_positions = int(image_mask.sum())
        if num_positions != image_features.shape[0]:
            raise ValueError(
                f"input_ids hold {num_positions} image tokens but the images give {image_features.shape[0]} "
                "image features; expand each <image> with the processor that planned the images "
                "(same max_image_tokens) and do not truncate through image tokens"
            )
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

    # --- forward / generate -----------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        image_token_hw: torch.LongTensor | None = None,
        image_shuffle_factor: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                image_features = self.get_image_features(
                    pixel_values, image_grid_hw, image_token_hw, image_shuffle_factor
                )
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            elif cache is None or cache.get_seq_length() == 0:
                num_image_tokens = int((input_ids == self.config.image_token_id).sum())
                if num_image_tokens:
                    raise ValueError(f"input_ids hold {num_image_tokens} image tokens but no pixel_values were given")
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and model_inputs.get("cache") is not None:
            for name in PLAN_INPUTS:  # pixels are only needed at prefill; transformers drops pixel_values itself
                model_inputs.pop(name, None)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, **kwargs):
        if expand_size != 1:
            raise NotImplementedError(
                "nanoVLM generation supports one sequence per prompt (num_beams=1, num_return_sequences=1)"
            )
        return super()._expand_inputs_for_generation(expand_size=expand_size, **kwargs)


__all__ = [
    "NanoVLMForConditionalGeneration",
    "NanoVLMPreTrainedModel",
    "NanoVLMConnector",
    "Float32VisionRope",
    "pixel_shuffle",
    "pixel_unshuffle",
    "IMAGE_TOKEN",
]
