"""Fused episodic attention: one softmax over the global keys and the local keys, in one pass.

A chunk of L queries attends over
  global keys (init + retrieved events, at position 0) with the queries rotated to the memory distance,
  local keys  (the W window keys, then the chunk's own L keys) with the queries at local positions:
              query i sees local key j iff j < W + i + 1 (the window fully, the chunk causally).
GQA: the Hq query heads share Hkv key/value heads (Hq = G * Hkv); K/V are never repeated.

`episodic_attention_reference` (materialised fp32 logits) and the Triton launcher `episodic_attention`
share one signature and return (out in the query dtype, lse fp32 natural log).
"""

from __future__ import annotations

import math

import torch

from .backend import MAX_HEAD_DIM, check_launchable, is_interpreted, next_power_of_2


def _check_shapes(q_mem, q_local, k_global, v_global, k_local, v_local, window_len: int) -> None:
    b, hq, length, d = q_local.shape
    hkv = k_local.shape[1]
    if q_mem.shape != q_local.shape:
        raise ValueError(f"q_mem {tuple(q_mem.shape)} and q_local {tuple(q_local.shape)} differ")
    key_sets = {"k_global": k_global, "v_global": v_global, "k_local": k_local, "v_local": v_local}
    for name, t in key_sets.items():
        if t.dim() != 4 or t.shape[0] != b or t.shape[1] != hkv or t.shape[3] != d:
            raise ValueError(f"{name} {tuple(t.shape)} does not match (B={b}, Hkv={hkv}, N, D={d})")
    if k_global.shape != v_global.shape or k_local.shape != v_local.shape:
        raise ValueError("keys and values of one set must have the same shape")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    if k_local.shape[2] != window_len + length:
        msg = f"k_local holds {k_local.shape[2]} keys; expected window_len + L = {window_len} + {length}"
        raise ValueError(msg)


def _fold(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, L, ...) -> (B, Hkv, G*L, ...): query heads sharing a KV head become one longer query."""
    b, hq, length = x.shape[:3]
    return x.reshape(b, num_kv_heads, (hq // num_kv_heads) * length, *x.shape[3:])


def local_visibility(query_len: int, window_len: int, groups: int, device) -> torch.Tensor:
    """(G*L, W+L) bool: folded row g*L + i sees local key j iff j < W + i + 1."""
    pos = torch.arange(query_len, device=device).repeat(groups)
    keys = torch.arange(window_len + query_len, device=device)
    return keys[None, :] < window_len + pos[:, None] + 1


def episodic_attention_reference(
    q_mem: torch.Tensor,
    q_local: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    scale: float,
    window_len: int,
    return_lse: bool = True,
):
    """q_* (B,Hq,L,D); k/v_global (B,Hkv,Ng,D); k/v_local (B,Hkv,W+L,D) -> out (B,Hq,L,D) [, lse (B,Hq,L)].

    Materialises the fp32 logits of both key sets; the torch path and the kernels' oracle.
    """
    _check_shapes(q_mem, q_local, k_global, v_global, k_local, v_local, window_len)
    hq, hkv, length = q_local.shape[1], k_local.shape[1], q_local.shape[2]
    global_logits = _fold(q_mem, hkv).float() @ k_global.float().transpose(-1, -2)  # (B,Hkv,G*L,Ng)
    local_logits = _fold(q_local, hkv).float() @ k_local.float().transpose(-1, -2)  # (B,Hkv,G*L,W+L)
    visible = local_visibility(length, window_len, hq // hkv, q_local.device)
    local_logits = local_logits.masked_fill(~visible, float("-inf"))
    logits = torch.cat((global_logits, local_logits), dim=-1) * scale
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    values = torch.cat((v_global, v_local), dim=2).float()
    out = (probs @ values).reshape(q_local.shape).to(q_local.dtype)
    lse = lse.reshape(q_local.shape[:3])
    return (out, lse) if return_lse else out


def _block_sizes(rows: int, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 16 rows at least (tl.dot's minimum), 128 for long chunks."""
    block_m = min(128 if block_d <= 128 else 64, max(16, next_power_of_2(rows)))
    block_n = 64 if block_d <= 128 else 32
    num_warps = 8 if block_m * block_d >= 128 * 128 else 4
    return block_m, block_n, num_warps


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def episodic_attention(
    q_mem: torch.Tensor,
    q_local: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    scale: float,
    window_len: int,
    return_lse: bool = True,
):
    """The Triton kernel; same contract as `episodic_attention_reference`. Any strides except along D."""
    _check_shapes(q_mem, q_local, k_global, v_global, k_local, v_local, window_len)
    from ._episodic_attention_jit import LOG2E, episodic_attention_kernel

    tensors = [_last_dim_contiguous(t) for t in (q_mem, q_local, k_global, v_global, k_local, v_local)]
    check_launchable(episodic_attention_kernel, *tensors)
    q_mem, q_local, k_global, v_global, k_local, v_local = tensors
    b, hq, length, d = q_local.shape
    hkv = k_local.shape[1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} exceeds {MAX_HEAD_DIM}")
    out = torch.empty(q_local.shape, dtype=q_local.dtype, device=q_local.device)
    lse = torch.empty(q_local.shape[:3], dtype=torch.float32, device=q_local.device)
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    num_global = k_global.shape[2]
    if num_global == 0:  # never read, but an empty tensor's null pointer would be refused at launch
        k_global, v_global = k_local, v_local
    groups = hq // hkv
    block_d = max(16, next_power_of_2(d))
    block_m, block_n, num_warps = _block_sizes(groups * length, block_d)
    grid = (math.ceil(groups * length / block_m), b * hkv)
    episodic_attention_kernel[grid](
        q_mem, q_local, k_global, v_global, k_local, v_local, out, lse,
        *q_mem.stride()[:3], *q_local.stride()[:3],
        *k_global.stride()[:3], *v_global.stride()[:3],
        *k_local.stride()[:3], *v_local.stride()[:3],
        *out.stride()[:3],
        hkv, length, num_global, k_local.shape[2], window_len, d, scale * LOG2E,
        GROUP=groups, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE_FP32=q_local.dtype == torch.float32 or is_interpreted(episodic_attention_kernel),
        num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    return (out, lse) if return_lse else out


__all__ = ["episodic_attention", "episodic_attention_reference", "local_visibility"]
