"""Received attention mass: how much attention each local key got from a chunk's queries.

mass[b, j] = sum over query heads h and queries i that see key j of
             exp(scale * <q_local[b, h, i], k_local[b, kv(h), j]> - lse[b, h, i]),
with the visibility of `episodic_attention` (query i sees local key j iff j < W + i + 1) and lse the final
log-normaliser over global + local keys. The engine picks each event's representative tokens
with it. A second, cheap kernel rather than a third output of the attention kernel: the mass needs the
final lse, which the single attention pass knows only after its last key.

`received_mass_reference` and the Triton launcher `received_mass` share one signature.
"""

from __future__ import annotations

import math

import torch

from .backend import MAX_HEAD_DIM, check_launchable, is_interpreted, next_power_of_2
from .episodic_attention import local_visibility


def _check_shapes(q_local: torch.Tensor, k_local: torch.Tensor, lse: torch.Tensor, window_len: int) -> None:
    b, hq, length, d = q_local.shape
    if k_local.dim() != 4 or k_local.shape[0] != b or k_local.shape[3] != d or hq % k_local.shape[1]:
        raise ValueError(f"k_local {tuple(k_local.shape)} does not fit q_local {tuple(q_local.shape)}")
    if lse.shape != q_local.shape[:3]:
        raise ValueError(f"lse {tuple(lse.shape)} must be (B, Hq, L) = {tuple(q_local.shape[:3])}")
    if k_local.shape[2] != window_len + length:
        msg = f"k_local holds {k_local.shape[2]} keys; expected window_len + L = {window_len} + {length}"
        raise ValueError(msg)


def received_mass_reference(
    q_local: torch.Tensor, k_local: torch.Tensor, lse: torch.Tensor, scale: float, window_len: int
) -> torch.Tensor:
    """q_local (B,Hq,L,D), k_local (B,Hkv,W+L,D), lse (B,Hq,L) -> mass (B, W+L) fp32."""
    _check_shapes(q_local, k_local, lse, window_len)
    b, hq, length, d = q_local.shape
    hkv = k_local.shape[1]
    folded_q = q_local.reshape(b, hkv, (hq // hkv) * length, d).float()
    folded_lse = lse.reshape(b, hkv, (hq // hkv) * length, 1).float()
    logits = folded_q @ k_local.float().transpose(-1, -2) * scale  # (B,Hkv,G*L,W+L)
    probs = torch.exp(logits - folded_lse)
    visible = local_visibility(length, window_len, hq // hkv, q_local.device)
    return (probs * visible).sum(dim=(1, 2))


def received_mass_launch_config(block_d: int, exact_fp32: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M query rows per step, BLOCK_N keys per program, num_warps) on a GPU. Exact fp32 products
    run on the FMA units and spill registers past 32x32 blocks (see compile_check)."""
    if exact_fp32:
        return 32, 32, 4
    return 64, 64 if block_d <= 128 else 32, 4


def received_mass(
    q_local: torch.Tensor, k_local: torch.Tensor, lse: torch.Tensor, scale: float, window_len: int
) -> torch.Tensor:
    """The Triton kernel; same contract as `received_mass_reference`."""
    _check_shapes(q_local, k_local, lse, window_len)
    from ._episodic_attention_jit import LOG2E
    from ._received_mass_jit import received_mass_kernel

    q_local = q_local if q_local.stride(-1) == 1 else q_local.contiguous()
    k_local = k_local if k_local.stride(-1) == 1 else k_local.contiguous()
    lse = lse.float().contiguous()
    check_launchable(received_mass_kernel, q_local, k_local, lse)
    b, hq, length, d = q_local.shape
    hkv, num_local = k_local.shape[1], k_local.shape[2]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} exceeds {MAX_HEAD_DIM}")
    partial = torch.zeros(b, hkv, num_local, dtype=torch.float32, device=q_local.device)
    if num_local == 0 or length == 0:
        return partial.sum(dim=1)
    block_d = max(16, next_power_of_2(d))
    interpreted = is_interpreted(received_mass_kernel)
    exact_fp32 = q_local.dtype == torch.float32 and not interpreted
    block_m, block_n, num_warps = received_mass_launch_config(block_d, exact_fp32)
    grid = (math.ceil(num_local / block_n), b * hkv)
    received_mass_kernel[grid](
        q_local, k_local, lse, partial,
        *q_local.stride()[:3], *k_local.stride()[:3],
        hkv, length, num_local, window_len, d, scale * LOG2E,
        GROUP=hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE_FP32=q_local.dtype == torch.float32 or interpreted,
        num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    return partial.sum(dim=1)


__all__ = ["received_mass", "received_mass_reference"]
