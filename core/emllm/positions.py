"""Rotary position tables taken from the model's own rotary embedding.

The model runs with position_ids all zero, so its own RoPE only multiplies q and k by its attention
scaling (1.0 except for YaRN-like types). We rotate q and k ourselves with cos/sin from the same module,
divided by that scaling so it is applied once. Llama-3 scaling, YaRN, partial rotary dimensions
(rotary_dim < head_dim) come for free. Knows nothing about memory or retrieval.
"""

from __future__ import annotations

import torch
from torch import nn


def find_rotary_embedding(model: nn.Module) -> nn.Module:
    """The model's shared rotary embedding module (`model.model.rotary_emb` in transformers 5)."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        return rotary
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    msg = f"{type(model).__name__} has no rotary embedding module; episodic attention needs RoPE"
    raise ValueError(msg)


class RotaryTable:
    """cos/sin for positions 0..length-1, as the model computes them, without its attention scaling."""

    def __init__(
        self, rotary: nn.Module, length: int, device: torch.device, dtype: torch.dtype = torch.float32
    ):
        probe = torch.zeros(1, device=device, dtype=torch.float32)
        positions = torch.arange(length, device=device)[None]
        with torch.no_grad():
            cos, sin = rotary(probe, positions)  # (1, length, rotary_dim)
        scaling = cos[0, 0, 0].item()  # cos(0) * attention_scaling
        self.cos = (cos[0].float() / scaling).to(dtype)
        self.sin = (sin[0].float() / scaling).to(dtype)
        self.length = length
        self.rotary_dim = self.cos.shape[-1]

    def rotate(self, x: torch.Tensor, start: int, count: int | None = None) -> torch.Tensor:
        """Rotate x (..., T, D) as if its tokens sat at positions start..start+T-1."""
        t = x.shape[-2] if count is None else count
        if start < 0 or start + t > self.length:
            msg = f"positions {start}..{start + t - 1} outside the rotary table (0..{self.length - 1})"
            raise IndexError(msg)
        cos = self.cos[start : start + t].to(x.dtype)
        sin = self.sin[start : start + t].to(x.dtype)
        return apply_rotary(x, cos, sin)

    def rotate_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Rotate every token of x (..., T, D) to the same position."""
        if not 0 <= position < self.length:
            raise IndexError(f"position {position} outside the rotary table (0..{self.length - 1})")
        cos = self.cos[position].to(x.dtype)
        sin = self.sin[position].to(x.dtype)
        return apply_rotary(x, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on the first cos.shape[-1] dims of x; the rest passes through (partial rotary)."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated_half * sin
    if rest.shape[-1] == 0:
        return out
    return torch.cat((out, rest), dim=-1)


__all__ = ["RotaryTable", "apply_rotary", "find_rotary_embedding"]
