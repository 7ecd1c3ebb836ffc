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

from .backend import (
    MAX_HEAD_DIM,
    check_launchable,
    compute_capability,
    is_interpreted,
    multiprocessor_count,
    next_power_of_2,
)


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


def fold_query_groups(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, L, ...) -> (B, Hkv, G*L, ...): query heads sharing a KV head become one longer query (GQA
    without repeating K/V)."""
    b, hq, length = x.shape[:3]
    return x.reshape(b, num_kv_heads, (hq // num_kv_heads) * length, *x.shape[3:])


def unfold_query_groups(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Inverse of fold_query_groups for outputs (B, Hkv, G*L, D) and lse (B, Hkv, G*L)."""
    b, hkv, gl = x.shape[:3]
    length = gl // (num_q_heads // hkv)
    return x.reshape(b, num_q_heads, length, *x.shape[3:])


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
    fold = fold_query_groups
    global_logits = fold(q_mem, hkv).float() @ k_global.float().transpose(-1, -2)  # (B,Hkv,G*L,Ng)
    local_logits = fold(q_local, hkv).float() @ k_local.float().transpose(-1, -2)  # (B,Hkv,G*L,W+L)
    visible = local_visibility(length, window_len, hq // hkv, q_local.device)
    local_logits = local_logits.masked_fill(~visible, float("-inf"))
    logits = torch.cat((global_logits, local_logits), dim=-1) * scale
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    values = torch.cat((v_global, v_local), dim=2).float()
    out = (probs @ values).reshape(q_local.shape).to(q_local.dtype)
    lse = lse.reshape(q_local.shape[:3])
    return (out, lse) if return_lse else out


def attention_launch_config(
    rows: int, block_d: int, exact_fp32: bool = False, arch: int = 90
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for `rows` folded query rows on a GPU of compute capability `arch`
    (x10); compile_check shows each choice free of register spills.

    Tensor-core dtypes: 16 rows at least (tl.dot's minimum), 128 for long chunks (64 at head_dim 256), 8
    warps for those; 64 keys per step, 32 at head_dim 128 before Hopper and at 256. Exact fp32 products
    run on the FMA units and take 32x16 blocks (16x16 at head_dim 128).
    """
    if exact_fp32:
        return min(32 if block_d <= 64 else 16, max(16, next_power_of_2(rows))), 16, 4
    block_m = min(128 if block_d <= 128 else 64, max(16, next_power_of_2(rows)))
    block_n = 64 if block_d <= 64 or (block_d <= 128 and arch >= 90) else 32
    return block_m, block_n, 8 if block_m >= 128 or block_m * block_d >= 128 * 128 else 4


def split_count(programs: int, keys: int, block_n: int, device: torch.device) -> int:
    """How many key splits fill the GPU when the row blocks alone leave half its multiprocessors idle (a
    decoded token, a short last chunk, a model with few KV heads): one program per multiprocessor, each over
    4 key blocks at least. One on the CPU interpreter, and when the row blocks fill the device (a 512-token
    chunk of a Llama-3-8B shape)."""
    if device.type != "cuda":
        return 1
    processors = multiprocessor_count(device)
    if 2 * programs > processors:
        return 1
    return max(1, min(processors // programs, keys // (4 * block_n)))


def plan_splits(keys: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(splits, keys per split): runs of whole key blocks, as even as they come; only runs that hold keys."""
    keys_per_split = block_n * math.ceil(keys / (num_splits * block_n))
    return math.ceil(keys / keys_per_split), keys_per_split


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, B, Hq, L, D) normalised partials over disjoint key sets and their (S, B, Hq, L) lse -> one
    softmax's (out fp32, lse). Stacked, so any number of splits costs a fixed handful of kernel launches."""
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total).nan_to_num_(0.0)  # an all -inf row (no key at all) weighs nothing
    return (weights[..., None] * out.float()).sum(dim=0), total


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
    num_splits: int | None = None,
):
    """The Triton kernel; same contract as `episodic_attention_reference`. Any strides except along D.

    num_splits: runs the keys are cut into (split-KV), merged by lse afterwards; None picks as many as
    fill the GPU, which is one except for short query blocks (decoding) over many keys.
    """
    _check_shapes(q_mem, q_local, k_global, v_global, k_local, v_local, window_len)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
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
    interpreted = is_interpreted(episodic_attention_kernel)
    exact_fp32 = q_local.dtype == torch.float32 and not interpreted
    arch = compute_capability(q_local.device)
    block_m, block_n, num_warps = attention_launch_config(groups * length, block_d, exact_fp32, arch)
    grid_rows = (math.ceil(groups * length / block_m), b * hkv)
    keys = num_global + min(k_local.shape[2], window_len + length)
    if num_splits is None:
        num_splits = split_count(grid_rows[0] * grid_rows[1], keys, block_n, q_local.device)
    num_splits, keys_per_split = plan_splits(keys, num_splits, block_n)
    if num_splits > 1:  # partials in the output's dtype (one kernel variant for both), fp32 lse; merged below
        target = torch.empty((num_splits, *out.shape), dtype=out.dtype, device=out.device)
        target_lse = torch.empty((num_splits, *lse.shape), dtype=torch.float32, device=out.device)
    else:
        target, target_lse = out[None], lse[None]
    episodic_attention_kernel[(*grid_rows, num_splits)](
        q_mem, q_local, k_global, v_global, k_local, v_local, target, target_lse,
        *q_mem.stride()[:3], *q_local.stride()[:3],
        *k_global.stride()[:3], *v_global.stride()[:3],
        *k_local.stride()[:3], *v_local.stride()[:3],
        *target.stride()[:4], target_lse.stride(0),
        hkv, length, num_global, k_local.shape[2], window_len, keys_per_split, d, scale * LOG2E,
        GROUP=groups, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE_FP32=q_local.dtype == torch.float32 or interpreted,
        num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        merged, lse = merge_splits(target, target_lse)
        out = merged.to(out.dtype)
    return (out, lse) if return_lse else out


__all__ = [
    "attention_launch_config",
    "episodic_attention",
    "episodic_attention_reference",
    "local_visibility",
    "merge_splits",
    "plan_splits",
    "split_count",
]
