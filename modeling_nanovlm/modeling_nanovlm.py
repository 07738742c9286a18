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
from huggingface_hub import HfApi
from torch import nn
from transformers import AutoModel, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTRopePositionEmbedding,
    augment_patches_center_coordinates,
    get_patches_center_coordinates,
)

from .configuration_nanovlm import NanoVLMConfig
from .connector import build_connector
from .model_card import render_model_card

IMAGE_TOKEN = "<image>"
PLAN_INPUTS = ("image_grid_hw", "image_token_hw", "image_shuffle_factor")


def normalize_pixels(pixel_values: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """uint8 patches (P, 3 * p * p), channel-first inside each patch, to `(x / 255 - mean) / std` in `dtype`.

    The image processor's `pixel_dtype="uint8"` sends pixels this way (4x fewer bytes to the device); the arithmetic
    runs in float32 on the pixels' device, as the processor's float32 path does, then casts.
    """
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"uint8 pixel_values need the image processor's mean and std, "
            f"but the model config has image_mean={mean!r}, "
            f"image_std={std!r}; set config.image_mean / config.image_std to the processor's (3 values each)"
        )
    mean = torch.tensor(mean, dtype=torch.float32, device=pixel_values.device)
    std = torch.tensor(std, dtype=torch.float32, device=pixel_values.device)
    patches = pixel_values.reshape(pixel_values.shape[0], 3, -1).to(torch.float32)
    patches = patches.mul_((1.0 / (255.0 * std))[:, None]).sub_((mean / std)[:, None])
    return patches.view(pixel_values.shape).to(dtype)


def _zero_gradient(parameters) -> torch.Tensor | float:
    """0 x the sum of `parameters`: added to an output, it gives every one of them a gradient (of zeros).

    FSDP and DeepSpeed ZeRO reduce every parameter's gradient on every process, so a parameter one process did not
    use in its batch (a shuffle factor its images did not plan, the tower in a text-only batch) would leave the
    processes' reductions mismatched; plain DDP would need `find_unused_parameters`.
    """
    total = sum(parameter.sum() for parameter in parameters)
    return total * 0.0


def tower_grid(pixel_values: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """(Gh, Gw) of what the vision tower is given: patches (B, Gh, Gw, 3, p, p) or an image (B, 3, H, W)."""
    if pixel_values.dim() == 6:
        return pixel_values.shape[1], pixel_values.shape[2]
    return pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size


class PatchEmbeddingConv(nn.Conv2d):
    """DINOv3's patch-embedding conv (kernel = stride = patch size) that also takes an image already cut into patches.

    The image processor sends each patch as one row laid out as this conv's kernel is, (channel, row, column), so
    a kernel-sized convolution of a patch is one matrix product with the flattened kernel: the tower embeds the
    patches as they arrive and no image is rebuilt (as Qwen2-VL's PatchEmbed does). Patches (B, Gh, Gw, 3, p, p)
    give (B, D, Gh, Gw), what the conv gives for the (B, 3, Gh*p, Gw*p) image; an image is convolved as usual.
    It holds the replaced conv's own parameters, so checkpoint keys (DINOv3's) do not change.
    """

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> PatchEmbeddingConv:
        """A `PatchEmbeddingConv` sharing `conv`'s weight and bias.

        Built on the meta device: nothing is initialised."""
        embedding = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            bias=conv.bias is not None,
            device="meta",
        )
        embedding.weight, embedding.bias = conv.weight, conv.bias
        # the tower initialised (or loaded) these parameters already: keep transformers' init pass off them
        embedding._is_hf_initialized = getattr(conv, "_is_hf_initialized", False)
        return embedding

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, Gh, Gw, 3, p, p) patches -> (B, D, Gh, Gw) by one matmul; a 4-D image goes through the conv as usual."""
        if pixel_values.dim() != 6:
            return super().forward(pixel_values)
        if tuple(pixel_values.shape[3:]) != (self.in_channels, *self.kernel_size):
            raise ValueError(
                f"patches of shape {tuple(pixel_values.shape[3:])} do not fit the tower's "
                f"{(self.in_channels, *self.kernel_size)} patch embedding"
            )
        embedded = F.linear(pixel_values.flatten(3), self.weight.flatten(1), self.bias)  # (B, Gh, Gw, D)
        return embedded.permute(0, 3, 1, 2)


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
        """cos, sin of the patch centres' 2-D RoPE angles, computed in float32 and cast to the query dtype."""
        grid_height, grid_width = tower_grid(pixel_values, self.config.patch_size)
        cos, sin = self.float32_cos_sin(grid_height, grid_width, pixel_values.device)
        device_type = pixel_values.device.type
        if torch.is_autocast_enabled(device_type):
            qk_dtype = torch.get_autocast_dtype(device_type)
        else:
            qk_dtype = pixel_values.dtype  # the tower casts pixels to its weight dtype first
        return cos.to(qk_dtype), sin.to(qk_dtype)


# Checkpoints keep the layout nanoVLM was first saved in (`language_model.model.*` = LlamaModel,
# `language_model.lm_head.*`, `vision_tower.*`, `connector.*` at the root); loading renames them to the
# LLaVA-style modules below and `save_pretrained` writes them back, as transformers does for LLaVA. Registered
# on import, so remote code (where `is_custom_code()` hides the built-in mappings) gets it too.
register_checkpoint_conversion_mapping(
    NanoVLMConfig.model_type,
    [
        WeightRenaming(source_patterns=r"^language_model\.lm_head\.", target_patterns="lm_head."),
        WeightRenaming(source_patterns=r"^language_model\.model\.", target_patterns="model.language_model."),
        WeightRenaming(source_patterns=r"^vision_tower\.", target_patterns="model.vision_tower."),
        WeightRenaming(source_patterns=r"^connector\.", target_patterns="model.connector."),
    ],
    overwrite=True,
)


class NanoVLMPreTrainedModel(PreTrainedModel):
    """The settings shared by the headless and the generation model: config class, attention backends, checkpointing."""

    config: NanoVLMConfig
    config_class = NanoVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # No `_no_split_modules` of its own: `post_init` gathers the tower's, the LM's and the connector's (the layers FSDP
    # wraps and device maps keep whole), so the list names only classes this model has.
    _skip_keys_device_placement = "cache"


class NanoVLMModel(NanoVLMPreTrainedModel):
    """The headless model: vision tower -> connector -> base decoder (no LM head); returns hidden states.

    `AutoModel` gives this class, as it gives `LlavaModel` for LLaVA.
    """

    def __init__(self, config: NanoVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower.rope_embeddings = Float32VisionRope(
            config.vision_config, augment=config.vision_rope_augmentation
        )
        embeddings = self.vision_tower.embeddings
        embeddings.patch_embeddings = PatchEmbeddingConv.replacing(embeddings.patch_embeddings)
        self.connector = build_connector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.num_prefix_tokens = 1 + config.vision_config.num_register_tokens  # CLS + registers, dropped
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` casts every float buffer, the LM's RoPE inverse frequencies included,
        # which costs the rotary angles their precision. Rebuild them in float32 after any cast.
        super()._apply(fn, recurse)
        for module in self.language_model.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if (
                isinstance(inv_freq, torch.Tensor)
                and inv_freq.dtype != torch.float32
                and inv_freq.device.type != "meta"
            ):
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
        """(total image tokens, text hidden) features, image after image in input order.

        `pixel_values` are the processor's (all patches, 3 * p * p) rows, image after image, each patch in the layout
        of the tower's patch-embedding kernel (channel, row, column); they reach the tower as they are.
        """
        if pixel_values.dtype == torch.uint8:  # the processor's pixel_dtype="uint8": normalise on this device
            config = self.config
            pixel_values = normalize_pixels(pixel_values, config.image_mean, config.image_std, self.vision_tower.dtype)
        if image_grid_hw is None or image_token_hw is None or image_shuffle_factor is None:
            raise ValueError(
                "pixel_values need their plan: pass image_grid_hw, image_token_hw and image_shuffle_factor "
                "as the processor returns them"
            )
        patch = self.config.patch_size
        if pixel_values.dim() != 2 or pixel_values.shape[1] != 3 * patch * patch:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} are not rows of 3 x {patch} x {patch} values, one "
                f"patch of this model's tower each: the image processor's patch_size must be the tower's ({patch}); "
                "build it with NanoVLMImageProcessor.from_model_config(model.config)"
            )
        grids = image_grid_hw.tolist()
        token_grids = image_token_hw.tolist()
        factors = image_shuffle_factor.tolist()
        patch_counts = [h * w for h, w in grids]
        if sum(patch_counts) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} patches but image_grid_hw describes {sum(patch_counts)}"
            )
        for grid, factor, token_hw in zip(grids, factors, token_grids):
            self.connector.check_plan(tuple(grid), factor, tuple(token_hw))
        images = pixel_values.split(patch_counts)
        by_shape = defaultdict(list)
        for index, grid in enumerate(grids):
            by_shape[tuple(grid)].append(index)

        features = [None] * len(grids)
        for (grid_height, grid_width), indices in by_shape.items():
            # the tower takes the patches as they are (`PatchEmbeddingConv`): no image is rebuilt from them
            pixels = torch.stack([images[i] for i in indices])
            pixels = pixels.view(len(indices), grid_height, grid_width, 3, patch, patch)
            hidden = self.vision_tower(pixel_values=pixels).last_hidden_state[:, self.num_prefix_tokens :]
            by_plan = defaultdict(list)
            for row, index in enumerate(indices):
                by_plan[(factors[index], tuple(token_grids[index]))].append(row)
            for (factor, token_hw), rows in by_plan.items():
                tokens = self.connector(hidden[rows], (grid_height, grid_width), factor, token_hw)
                for row, image_tokens in zip(rows, tokens):
                    features[indices[row]] = image_tokens
        features = torch.cat(features)
        if self.training:
            features = features + _zero_gradient(self.connector.unused_parameters(set(factors)))
        return features

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """(batch, length) mask of the `<image>` positions: from `input_ids`, or, with embeddings only, the
        positions whose embedding is exactly the `<image>` token's (as LLaVA finds them)."""
        if input_ids is not None and input_ids.numel():
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding.to(inputs_embeds.dtype)).all(-1)

    def merge_image_features(self, image_mask, inputs_embeds, image_features, source: str = "input_ids"):
        """Place image features at the `<image>` positions (found in `source`); the counts must agree exactly."""
        num_positions = int(image_mask.sum())
        if num_positions != image_features.shape[0]:
            raise ValueError(
                f"{source} hold {num_positions} image tokens but the images give {image_features.shape[0]} "
                "image features; expand each <image> with the processor that planned the images "
                "(same max_image_tokens) and do not truncate through image tokens"
            )
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

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
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The decoder's hidden states, with image features at the `<image>` positions.

        With `inputs_embeds` (instead of `input_ids`) and `pixel_values`, the image positions are those whose
        embedding is the `<image>` token's, so pass embeddings taken from `get_input_embeddings()`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_grid_hw, image_token_hw, image_shuffle_factor)
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            source = "input_ids" if input_ids is not None else "inputs_embeds"
            inputs_embeds = self.merge_image_features(image_mask, inputs_embeds, image_features, source)
        elif input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            num_image_tokens = int((input_ids == self.config.image_token_id).sum())
            if num_image_tokens:
                raise ValueError(f"input_ids hold {num_image_tokens} image tokens but no pixel_values were given")
        if pixel_values is None and self.training:  # a text-only batch: the tower and connector still get gradients
            # (DINOv3's mask_token is never used here, so it stays without a gradient on every process alike)
            mask_token = getattr(self.vision_tower.embeddings, "mask_token", None)
            image_path = [
                p for p in [*self.vision_tower.parameters(), *self.connector.parameters()] if p is not mask_token
            ]
            inputs_embeds = inputs_embeds + _zero_gradient(image_path)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )


class NanoVLMForConditionalGeneration(NanoVLMPreTrainedModel, GenerationMixin):
    """`NanoVLMModel` + an LM head: logits, loss and `generate`. `AutoModelForImageTextToText` gives this class."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: NanoVLMConfig):
        super().__init__(config)
        self.model = NanoVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # The parts, by the names nanoVLM has always used (`language_model` is the base decoder, without head).
    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def connector(self):
        return self.model.connector

    @property
    def language_model(self):
        return self.model.language_model

    # --- construction from pretrained parts -------------------------------------------------------

    @classmethod
    def from_backbones(
        cls, vision_model: str, text_model: str, tokenizer=None, gguf_file: str | None = None, **config_kwargs
    ):
        """A model from a pretrained DINOv3 tower and a pretrained Llama-family LM (Hub ids or folders).

        `vision_model` may also be a saved nanoVLM folder (its tower is taken) or a `DINOv3ViTConfig` (a random tower,
        trained from scratch).

        `text_model` may also be a GGUF file (`*.gguf`, or a folder with `gguf_file=` naming the file in it; needs
        the `gguf` package): its weights are de-quantised into a plain, saveable model and its tokenizer is read
        from the file. The `<image>` token is added to the LM's tokenizer (or to `tokenizer`, if given) and the
        embeddings are resized to match; generation never emits `<image>` nor the rows added past the tokenizer
        (`suppress_undecodable_tokens`). The connector starts from random weights. `config_kwargs` set the other
        `NanoVLMConfig` fields (`shuffle_factors=[2, 4]`, `connector="perceiver"`, ...); the matching processor
        reads them from the model: `NanoVLMProcessor.from_backbones(text_model, model_config=model.config, ...)`.
        """
        from .backbones import (  # build time only: not on a loaded model's path
            load_language_model,
            load_tokenizer,
            load_vision_tower,
        )

        vision = load_vision_tower(vision_model)
        language = load_language_model(text_model, gguf_file)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(text_model, gguf_file)
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
        model.language_model.load_state_dict(language.base_model.state_dict())
        model.lm_head.load_state_dict(language.get_output_embeddings().state_dict())
        model.generation_config = language.generation_config
        model.suppress_undecodable_tokens(len(tokenizer))
        text_source = str(Path(text_model) / gguf_file) if gguf_file else str(text_model)
        pretrained_tower = [] if isinstance(vision_model, PretrainedConfig) else [str(vision_model)]
        model.config.base_models = [*pretrained_tower, text_source]
        return model

    def suppress_undecodable_tokens(self, tokenizer_size: int) -> None:
        """Never generate `<image>` (features go there, not text) nor the embedding rows past `tokenizer_size`.

        Resizing the embeddings to a multiple of 64 (fast kernels) adds rows no tokenizer entry decodes; the LM head
        shares them, so their logits are real. transformers' `suppress_tokens` sets those logits to -inf at every
        step of `generate` (greedy, sampling, beams, pipelines), and is saved in generation_config.json, so a
        reloaded model behaves the same.
        """
        vocab_size = self.config.text_config.vocab_size
        if not 0 < tokenizer_size <= vocab_size:
            raise ValueError(f"tokenizer_size {tokenizer_size} does not fit the model's vocabulary of {vocab_size}")
        undecodable = [self.config.image_token_id, *range(tokenizer_size, vocab_size)]
        kept = [token for token in (self.generation_config.suppress_tokens or []) if token not in undecodable]
        self.generation_config.suppress_tokens = kept + undecodable

    def save_pretrained(self, save_directory, *args, processor=None, metrics=None, **kwargs):
        """Weights, config and remote code (transformers), plus a model card; `processor` is saved alongside
        (refused with a `ValueError` when its plans would not fit this model, before anything is written)."""
        if processor is not None and hasattr(processor, "check_model_config"):
            processor.check_model_config(self.config)
        # transformers records one auto class per model class; the saved config maps AutoModel to the headless
        # model, whose module file is this one (so it is already copied next to the weights).
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}), "AutoModel": f"{module}.NanoVLMModel"
            }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):  # on several processes only the main one writes files
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
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # --- forward / generate -----------------------------------------------------------------------

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_hw: torch.Tensor,
        image_token_hw: torch.Tensor,
        image_shuffle_factor: torch.Tensor,
    ) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, image_grid_hw, image_token_hw, image_shuffle_factor)

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
        """Logits (and, with `labels`, the causal LM loss). Labels at `<image>` positions never count: a generic
        collator (TRL's, for one) copies `input_ids` into `labels`, image tokens included."""
        if labels is not None:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("pass exactly one of input_ids or inputs_embeds")
            image_mask = self.model.get_placeholder_mask(input_ids, inputs_embeds)
            labels = labels.masked_fill(image_mask.to(labels.device), -100)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_hw=image_grid_hw,
            image_token_hw=image_token_hw,
            image_shuffle_factor=image_shuffle_factor,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, is_first_iteration=False, **kwargs):
        # `inputs_embeds` is named so that generate accepts it (image positions are then found from the embeddings)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration and model_inputs.get("cache") is not None:
            for name in PLAN_INPUTS:  # pixels are only needed at prefill; transformers drops pixel_values itself
                model_inputs.pop(name, None)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams / several sequences per prompt: sample i's rows are repeated `expand_size` times, and so are its
        images. Pixels are flattened patches with per-image plans, so they are split per image, grouped per
        sample (by the sample's `<image>` token count) and each group repeated, in sample order."""
        images = {}
        if expand_size != 1 and model_kwargs.get("pixel_values") is not None:
            images = self._expand_images(expand_size, input_ids, model_kwargs)
            for name in images:  # the stock expansion would repeat them per row once more
                model_kwargs.pop(name)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, **images}

    def _expand_images(self, expand_size: int, input_ids, model_kwargs: dict) -> dict:
        token_hw = model_kwargs["image_token_hw"]
        grid_hw = model_kwargs["image_grid_hw"]
        tokens_per_image = (token_hw[:, 0] * token_hw[:, 1]).tolist()
        image_mask = self.model.get_placeholder_mask(input_ids, model_kwargs.get("inputs_embeds"))
        tokens_per_sample = image_mask.sum(-1).tolist()
        images_per_sample, image = [], 0
        for tokens in tokens_per_sample:
            first = image
            while tokens > 0 and image < len(tokens_per_image):
                tokens -= tokens_per_image[image]
                image += 1
            if tokens != 0:
                raise ValueError(
                    "the <image> tokens of each sample do not add up to whole images of image_token_hw; "
                    "expand the prompts with the processor that planned the images"
                )
            images_per_sample.append(range(first, image))
        if image != len(tokens_per_image):
            raise ValueError(f"{len(tokens_per_image)} images were given but the prompts hold tokens for {image}")
        order = [index for images in images_per_sample for _ in range(expand_size) for index in images]
        patches = model_kwargs["pixel_values"].split((grid_hw[:, 0] * grid_hw[:, 1]).tolist())
        return {
            "pixel_values": torch.cat([patches[index] for index in order]) if order else model_kwargs["pixel_values"],
            **{name: model_kwargs[name][order] for name in PLAN_INPUTS},
        }


__all__ = [
    "NanoVLMForConditionalGeneration",
    "NanoVLMModel",
    "NanoVLMPreTrainedModel",
    "Float32VisionRope",
    "PatchEmbeddingConv",
    "IMAGE_TOKEN",
]
