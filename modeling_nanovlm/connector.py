"""The connector: the patch features of the images of one plan -> their image tokens at the LM's width.

    build_connector(config)   ShuffleConnector (config.connector == "shuffle") or PerceiverConnector ("perceiver")

Both take (B, Gh*Gw, D) features of B images that share one patch grid and one plan and give (B, th*tw, text_dim).
Whether a plan fits the model is checked once per call, before any arithmetic (`check_plan`, called by
`NanoVLMModel.get_image_features`); the forwards assume plans that passed it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

from .configuration_nanovlm import NanoVLMConfig


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
        raise ValueError(
            f"pixel_unshuffle: ({length}, {dim}) is not a {grid_height}x{grid_width} grid shuffled by {factor}"
        )
    x = x.reshape(batch, rows, cols, factor, factor, dim // (factor * factor))
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid_height * grid_width, dim // (factor * factor))


def on_grid(grid_op, tokens: torch.Tensor, grid_hw: tuple[int, int], *args) -> torch.Tensor:
    """Apply a (B, D, H, W) image op (pooling, a convolution) to (B, H*W, D) row-major tokens; tokens come back."""
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid_hw)
    return grid_op(grid, *args).flatten(2).transpose(1, 2)


def grid_position_embedding(grid_height: int, grid_width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(Gh*Gw, dim) fixed 2-D sin-cos embedding of each cell's centre, in coordinates relative to the image (0-1).

    Relative coordinates make it the same for every resolution; half the channels encode the row, half the column,
    at geometric frequencies.
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


class ProjectionMLP(nn.Module):
    """Linear -> activation -> Linear: a projection to the LM width (LLaVA's two-layer MLP)."""

    def __init__(self, in_features: int, out_features: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GridContext(nn.Conv2d):
    """A residual k x k convolution over a grid of tokens (odd k, zero padding keeps the grid): each token also
    carries its neighbourhood, the locality-keeping idea of Honeybee's C-Abstractor and MobileVLM's LDP."""

    def __init__(self, dim: int, kernel: int):
        super().__init__(dim, dim, kernel, padding=kernel // 2)

    def forward(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        return tokens + on_grid(super().forward, tokens, grid_hw)


class TokenPositions(nn.Linear):
    """Adds a learned map of each token's 2-D place in its image (`grid_position_embedding`) to the token.

    The LM's positions are 1-D: a token's row and column depend on the token grid's width, which changes with the
    image and the budget; this tells the LM where in the image each token is, the same way at every resolution.
    """

    def __init__(self, dim: int):
        super().__init__(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor, token_hw: tuple[int, int]) -> torch.Tensor:
        positions = grid_position_embedding(*token_hw, tokens.shape[-1], tokens.device, tokens.dtype)
        return tokens + super().forward(positions)


class ShuffleConnector(nn.Module):
    """Pixel shuffle by the plan's factor s, then factor s's projection (LLaVA / Idefics3 style, one per factor).

    With `shared_cell_encoder` the smallest factor's cells (s0 x s0 patches) are encoded once by a layer every factor
    shares, and factor s merges its (s/s0)^2 encoded cells with its own linear layer (`projections[s]`); without it
    the cell is one patch, the encoder passes it on, and `projections[s]` is a two-layer MLP. `cell_context`,
    `token_context` and `token_position` (the config's `cell_context_kernel`, `token_context_kernel`,
    `image_token_positions`) are None when off.
    """

    def __init__(self, config: NanoVLMConfig):
        super().__init__()
        vision_dim, text_dim = config.vision_config.hidden_size, config.text_config.hidden_size
        act, factors = config.projector_hidden_act, config.shuffle_factors
        self.cell_context = self.token_context = self.token_position = None
        if config.shared_cell_encoder:
            self.cell_size = factors[0]
            self.cell_encoder = nn.Sequential(nn.Linear(vision_dim * self.cell_size**2, text_dim), ACT2FN[act])
            self.projections = nn.ModuleDict(
                {str(s): nn.Linear(text_dim * (s // self.cell_size) ** 2, text_dim) for s in factors}
            )
            if config.cell_context_kernel:
                self.cell_context = GridContext(text_dim, config.cell_context_kernel)
        else:
            self.cell_size = 1
            self.cell_encoder = nn.Identity()
            self.projections = nn.ModuleDict(
                {str(s): ProjectionMLP(vision_dim * s * s, text_dim, act) for s in factors}
            )
        if config.token_context_kernel:
            self.token_context = GridContext(text_dim, config.token_context_kernel)
        if config.image_token_positions:
            self.token_position = TokenPositions(text_dim)

    def check_plan(self, grid_hw: tuple[int, int], factor: int, token_hw: tuple[int, int]) -> None:
        """A `ValueError` for a plan this connector cannot follow (another processor's factors or mode)."""
        factors = sorted(int(s) for s in self.projections)
        if factor not in factors:
            raise ValueError(
                f"the image processor planned shuffle factor {factor}, but this model only has projections for "
                f"{factors}: use processor and model with the same shuffle_factors"
            )
        grid_height, grid_width = grid_hw
        pooled_height, pooled_width = token_hw[0] * factor, token_hw[1] * factor
        if not (0 < pooled_height <= grid_height and 0 < pooled_width <= grid_width):
            raise ValueError(
                f"token grid {tuple(token_hw)} x shuffle factor {factor} does not fit the {grid_height}x{grid_width} "
                "patch grid: image_token_hw and image_shuffle_factor must come from the processor's plan"
            )
        if (pooled_height, pooled_width) != (grid_height, grid_width) and factor != factors[-1]:
            raise ValueError(
                f"the image processor pools at shuffle factor {factor}, which only happens when its factors "
                f"or connector mode differ from this model's (shuffle, {factors})"
            )

    def unused_parameters(self, factors: set[int]):
        """The projections of the factors no plan of this batch used (`factors` are the ones used)."""
        unused = [projection for s, projection in self.projections.items() if int(s) not in factors]
        return [parameter for projection in unused for parameter in projection.parameters()]

    def forward(self, features: torch.Tensor, grid_hw: tuple[int, int], factor: int, token_hw: tuple[int, int]):
        """(B, Gh*Gw, D) patch features of B images of one shape -> (B, th*tw, text_dim) image tokens."""
        height, width = token_hw[0] * factor, token_hw[1] * factor
        if (height, width) != tuple(grid_hw):  # the plan pools: (B, height*width, D)
            features = on_grid(F.adaptive_avg_pool2d, features, grid_hw, (height, width))
        cell = self.cell_size
        cell_grid = (height // cell, width // cell)
        cells = pixel_shuffle(features, height, width, cell)  # (B, cells, D*cell^2)
        cells = self.cell_encoder(cells)  # (B, cells, text_dim), or unchanged when the cell is one patch
        if self.cell_context is not None:
            cells = self.cell_context(cells, cell_grid)  # same shape, each cell + its neighbourhood
        merged = pixel_shuffle(cells, *cell_grid, factor // cell)  # (B, th*tw, (s/cell)^2 cells' features)
        tokens = self.projections[str(factor)](merged)  # (B, th*tw, text_dim)
        if self.token_context is not None:
            tokens = self.token_context(tokens, token_hw)  # same shape, each token + its neighbours
        if self.token_position is not None:
            tokens = self.token_position(tokens, token_hw)  # same shape, + each token's 2-D place
        return tokens


class PerceiverConnector(nn.Module):
    """A fixed number of latents per image, whatever its size: projection -> transformers' Idefics2 Perceiver.

    The context gets a fixed 2-D position embedding of each patch first: the resampler attends by content only and
    the tower's RoPE encodes relative positions only, so without it the latents cannot tell where a feature is.
    With `perceiver_pooled_queries` each latent's query starts as its region's average-pooled context plus the
    learned latent (so every output token begins with its own region's content); else the latents alone.
    """

    _no_split_modules = ["Idefics2PerceiverLayer"]  # gathered by the model's post_init: FSDP wraps each layer

    def __init__(self, config: NanoVLMConfig):
        super().__init__()
        text_dim = config.text_config.hidden_size
        self.projection = ProjectionMLP(config.vision_config.hidden_size, text_dim, config.projector_hidden_act)
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
        # Idefics2 creates every latent as ones: identical queries give identical output tokens, and on the digits
        # task the model learned only what one token carries (the quadrant, not the digit). Distinct small random
        # latents break that symmetry and keep a constant out of the output's residual.
        nn.init.normal_(self.perceiver.latents, std=config.text_config.initializer_range)
        latents = config.perceiver_latents
        rows = max(r for r in range(1, math.isqrt(latents) + 1) if latents % r == 0)  # the squarest grid
        self.query_grid = (rows, latents // rows) if config.perceiver_pooled_queries else None

    def check_plan(self, grid_hw: tuple[int, int], factor: int, token_hw: tuple[int, int]) -> None:
        latents = self.perceiver.n_latents
        if factor != 1 or token_hw[0] * token_hw[1] != latents:
            raise ValueError(
                f"the image processor planned {token_hw[0] * token_hw[1]} tokens (shuffle factor {factor}) but this "
                f"model's Perceiver gives {latents} per image: use a processor with connector='perceiver' and "
                f"perceiver_latents={latents}"
            )

    def unused_parameters(self, factors: set[int]):
        return []

    def forward(self, features: torch.Tensor, grid_hw: tuple[int, int], factor: int, token_hw: tuple[int, int]):
        """(B, Gh*Gw, D) patch features of B images of one shape -> (B, latents, text_dim) image tokens."""
        position = grid_position_embedding(*grid_hw, features.shape[-1], features.device, features.dtype)
        context = self.projection(features + position)  # (B, Gh*Gw, text_dim)
        queries = self.perceiver.latents.expand(context.shape[0], -1, -1)  # (B, latents, text_dim)
        if self.query_grid is not None:  # each region's pooled content plus its learned latent: same shape
            queries = on_grid(F.adaptive_avg_pool2d, context, grid_hw, self.query_grid) + self.perceiver.latents
        for layer in self.perceiver.layers:  # the resampler's own loop (nothing is padded: no mask)
            queries = layer(queries, context, attention_mask=None, position_ids=None)  # (B, latents, text_dim)
        return self.perceiver.norm(queries)


def build_connector(config: NanoVLMConfig) -> ShuffleConnector | PerceiverConnector:
    return {"shuffle": ShuffleConnector, "perceiver": PerceiverConnector}[config.connector](config)
