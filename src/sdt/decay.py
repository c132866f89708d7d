"""Spatial decay: the additive attention biases of RMT and SDT, as pure functions.

Notation: B batch, n heads, an H x W token grid, L = H * W tokens in raster (row-major) order,
so token i sits at row r_i = i // W and column c_i = i % W.

Every decay variant in this project is one formula over per-token (or per-head) *rates*
``s <= 0`` (after the learned scale alpha is folded in):

    bias[b, h, i, j] = -| (s[b, h, i] + s[b, h, j]) / 2 * dist(i, j) |

It is symmetric in (i, j), never positive (attention is only attenuated) and zero on the
diagonal. It is added to the attention logits before the softmax, exactly where RMT adds its mask.

- RMT's fixed decay: s[h] = lambda_h = log(1 - 2^-(init_value + heads_range * h / n)) for every
  token, and dist is the Manhattan distance. Then bias = lambda_h * dist, bit for bit RMT's mask.
- SDT's Context-Aware Gating: s[b, h, i] = alpha_h * logsigmoid(x_i W_g + b_g)[h].
- The "content" ablation replaces the distance by the indicator [i != j] (no spatial prior).

The full 2D form uses the Manhattan distance on the grid, a (L, L) matrix per head.
The decomposed form (RMT's "chunkwise" layout) attends along each row with the 1D distance
|c_i - c_j| and then along each column with |r_i - r_j|: two small (W, W) and (H, H) biases.

All results are float32, whatever the input dtype or autocast state, so that long distances
keep their precision under bf16/fp16 training.

``DECAY_VARIANTS`` is the one table of the variants (name -> token-dependent, learnable,
distance); ``DecayGate``, DiT, the command line, the config checks and the experiments read it.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .errors import DecayVariantError

DISTANCES = ("manhattan", "indicator")


@dataclass(frozen=True)
class DecayVariant:
    """One decay variant.

    Attributes:
        name: the name used by ``decay=`` (backbones) and ``attn=`` (DiT).
        token_dependent: rates per token, (B, n, L), from a gate on the input; else per head, (1, n, 1).
        learnable: has trained parameters (gate bias b and scale alpha; W_g if token-dependent).
        distance: one of ``DISTANCES``, or None for no decay bias at all.
        summary: the rate s in one line, for docs and help texts.
    """

    name: str
    token_dependent: bool
    learnable: bool
    distance: Optional[str]
    summary: str

    def __post_init__(self) -> None:
        if self.distance is not None and self.distance not in DISTANCES:
            raise ValueError(f"distance {self.distance!r} of decay {self.name!r} is not one of {DISTANCES}")

    @property
    def has_bias(self) -> bool:
        """False only for "none": the attention then gets no decay bias."""
        return self.distance is not None


DECAY_VARIANTS: Dict[str, DecayVariant] = {v.name: v for v in (
    DecayVariant("none", False, False, None, "no bias at all (rotary + LCE only; plain DiT attention)"),
    DecayVariant("fixed", False, False, "manhattan", "lambda_h (RMT), the same for every token"),
    DecayVariant("learned", False, True, "manhattan", "alpha_h * logsigmoid(b_h), the same for every token"),
    DecayVariant("cag", True, True, "manhattan", "alpha_h * logsigmoid(x_i W_g + b)_h (SDT)"),
    DecayVariant("content", True, True, "indicator", "alpha_h * logsigmoid(x_i W_g + b)_h, no spatial prior"),
)}

# Older names still accepted when read (saved configs, old run folders): DiT used to call "none" "vanilla".
DECAY_ALIASES: Dict[str, str] = {"vanilla": "none"}


def decay_variant(name: str) -> DecayVariant:
    """The variant called ``name`` (or one of its ``DECAY_ALIASES``).

    Raises:
        DecayVariantError: unknown name; the message lists the valid names.
    """
    variant = DECAY_VARIANTS.get(DECAY_ALIASES.get(name, name)) if isinstance(name, str) else None
    if variant is None:
        raise DecayVariantError(
            f"unknown decay {name!r}; choose one of {tuple(DECAY_VARIANTS)}"
            + "".join(f"; {alias!r} is read as {canon!r}" for alias, canon in DECAY_ALIASES.items()))
    return variant


def decay_rates(num_heads: int, init_value: float = 2.0, heads_range: float = 4.0) -> Tensor:
    """RMT's per-head log decay rates lambda_h = log(1 - 2^-(init_value + heads_range * h / n)).

    Head 0 decays fastest (most local). Same expression as RMT's ``RetNetRelPos2d`` so the
    values agree bit for bit.

    Returns:
        (n,) float32, every entry < 0.
    """
    heads = torch.arange(num_heads, dtype=torch.float)
    return torch.log(1 - 2 ** (-init_value - heads_range * heads / num_heads))


def rate_logits(rates: Tensor) -> Tensor:
    """Inverse of logsigmoid: the gate bias b with logsigmoid(b) == rates (rates < 0).

    Used to start a learned gate exactly at RMT's decay: logit(gamma) with gamma = exp(lambda).
    (n,) -> (n,).
    """
    return rates - torch.log(-torch.expm1(rates))


def _distance(delta: Tensor, kind: str) -> Tensor:
    if kind == "manhattan":
        return delta
    if kind == "indicator":
        return (delta > 0).to(delta.dtype)
    raise ValueError("unknown distance '" + kind + "'; expected 'manhattan' or 'indicator'")  # TorchScript: no f-strings


def grid_distance(height: int, width: int, kind: str = "manhattan", device: Optional[torch.device] = None) -> Tensor:
    """Pairwise distance between the tokens of an H x W grid in raster order.

    ``kind="manhattan"``: |r_i - r_j| + |c_i - c_j|; ``kind="indicator"``: 1 where i != j, else 0.

    Returns:
        (L, L) float32 with L = H * W.
    """
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(height * width, 2)
    delta = (grid[:, None, :] - grid[None, :, :]).abs().sum(dim=-1)
    return _distance(delta, kind)


def line_distance(length: int, kind: str = "manhattan", device: Optional[torch.device] = None) -> Tensor:
    """Pairwise distance |i - j| (or the indicator i != j) between positions on a line.

    Returns:
        (length, length) float32.
    """
    index = torch.arange(length, device=device, dtype=torch.float32)
    return _distance((index[:, None] - index[None, :]).abs(), kind)


def pairwise_decay_bias(rates: Tensor, distance: Tensor) -> Tensor:
    """The decay bias -|(s_i + s_j) / 2 * dist_ij| along the last axis of ``rates``.

    Args:
        rates: (..., m) rates of m tokens, or (..., 1) for one rate shared by every token.
        distance: (m, m).

    Returns:
        (..., m, m) float32 (the last two dims broadcast to (m, m)).
    """
    rates = rates.float()
    pair_rate = (rates.unsqueeze(-1) + rates.unsqueeze(-2)) * 0.5
    return -(pair_rate * distance).abs()


def full_2d_bias(rates: Tensor, height: int, width: int, kind: str = "manhattan") -> Tensor:
    """Full 2D decay bias over an H x W grid.

    Args:
        rates: (B', n, L') with B' in {1, B} and L' in {1, L}.

    Returns:
        (B', n, L, L) float32.
    """
    return pairwise_decay_bias(rates, grid_distance(height, width, kind, rates.device))


def decomposed_biases(rates: Tensor, height: int, width: int, kind: str = "manhattan") -> Tuple[Tensor, Tensor]:
    """Row and column decay biases of the decomposed (rows, then columns) layout.

    Args:
        rates: (B', n, L') with B' in {1, B} and L' in {1, L}.

    Returns:
        row_bias: (B', H', n, W, W) for attention within each row (1D distance |c_i - c_j|),
        col_bias: (B', W', n, H, H) for attention within each column (|r_i - r_j|),
        with H' = H, W' = W for per-token rates and H' = W' = 1 for per-head rates.
    """
    if rates.shape[-1] == 1:
        row_rates = rates.unsqueeze(1)  # (B', 1, n, 1)
        col_rates = row_rates
    else:
        grid_rates = rates.unflatten(-1, (height, width))
        row_rates = grid_rates.transpose(1, 2)  # (B, H, n, W)
        col_rates = grid_rates.permute(0, 3, 1, 2)  # (B, W, n, H)
    row_bias = pairwise_decay_bias(row_rates, line_distance(width, kind, rates.device))
    col_bias = pairwise_decay_bias(col_rates, line_distance(height, kind, rates.device))
    return row_bias, col_bias
