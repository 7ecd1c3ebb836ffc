"""Episodic attention: init + retrieved events + local window, each part with its own positions,
merged by log-sum-exp. Registered in transformers as the attention implementation "emllm".

Per layer and chunk of c new tokens (window of W older tokens, relative positions 0..W+c-1):
  global part : queries rotated to `memory_distance`, init and retrieved keys at position 0 (or, with
                memory_positions="ordered", the G global keys at 0..G-1 and the queries at G+W..G+W+c-1)
  local part  : queries at W..W+c-1 over the window keys at 0..W-1 (no mask)
  chunk part  : the chunk over itself, causal
Each part returns (output, lse); `merge_partials` combines them exactly as one softmax would. That torch
path is the CPU path and the reference; `use_triton_kernels` decides when LayerMemory takes the fused
Triton kernels of `emllm_kernels` instead (one pass over all three parts).

Knows nothing about segmentation or sessions: state arrives through the `emllm_context` forward kwarg.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from emllm_kernels import unavailable_reason

from .errors import ConfigError

if TYPE_CHECKING:
    from .memory import LayerMemory

ATTENTION_NAME = "emllm"

_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
_backend = "auto"  # "auto" | "reference"; tests force "reference" to compare the paths


def set_attention_backend(name: str) -> None:
    """Force the torch reference ("reference") or pick the fastest available ("auto")."""
    global _backend
    if name not in ("auto", "reference"):
        raise ValueError(f"unknown attention backend {name!r}; use 'auto' or 'reference'")
    _backend = name


def use_triton_kernels(choice: str, device: torch.device | str, head_dim: int) -> bool:
    """Resolve EMLLMConfig.kernels for one layer's tensors: True = the fused emllm_kernels path.

    "torch": never. "auto": on CUDA when the kernels can run there. "triton": always, or a ConfigError that
    says why they cannot run (no triton; CPU tensors without TRITON_INTERPRET=1; head_dim too large).
    """
    if choice == "torch":
        return False
    reason = unavailable_reason(device, head_dim)
    if choice == "auto":
        return reason is None and torch.device(device).type == "cuda"
    if reason is not None:
        raise ConfigError(f"kernels='triton' cannot run here: {reason}; use kernels='auto' or 'torch'")
    return True


def attend_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised softmax attention. q (B,H,Lq,D), k/v (B,H,Lk,D) -> out (B,H,Lq,D), lse (B,H,Lq) fp32.

    Causal means bottom-right aligned: query i sees keys j <= i + Lk - Lq.
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B,H,Lq,Lk)
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention returning the log-sum-exp, on the fastest path available (same contract as the reference).

    Zero keys give zero output and lse -inf (a part that contributes nothing to merge_partials); the CPU
    flash kernel would divide by zero on them.
    """
    if k.shape[-2] == 0:
        return torch.zeros_like(q), torch.full(q.shape[:-1], float("-inf"), device=q.device)
    if (
        _backend == "auto"
        and q.device.type == "cpu"
        and _HAS_CPU_FLASH
        and (not causal or q.shape[-2] == k.shape[-2])
    ):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )[:2]
        return out, lse.float()
    return attend_reference(q, k, v, scale, causal)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets.

    out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i: exactly one softmax over all keys.
    emllm_kernels.merge_splits is the same merge over stacked partials (the fused kernel's split-KV runs).
    This one stays a loop: stacking 2-3 parts costs the CPU path 1.7x (30 us a layer per decoded token).
    """
    if len(parts) == 1:
        return parts[0]
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    out = None
    for part_out, part_lse in parts:
        weighted = torch.exp(part_lse - lse)[..., None] * part_out.float()
        out = weighted if out is None else out.add_(weighted)
    return out.to(parts[0][0].dtype), lse


def fold_query_groups(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, L, D) -> (B, Hkv, G*L, D): query heads sharing a KV head become one longer query (GQA)."""
    b, hq, length, d = q.shape
    return q.reshape(b, num_kv_heads, (hq // num_kv_heads) * length, d)


def unfold_query_groups(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Inverse of fold_query_groups for outputs (B,Hkv,G*L,D) and lse (B,Hkv,G*L)."""
    b, hkv, gl = x.shape[:3]
    length = gl // (num_q_heads // hkv)
    return x.reshape(b, num_q_heads, length, *x.shape[3:])


def attend_grouped(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal GQA attention without repeating K/V: fold the query groups into the query length."""
    hq, hkv = q.shape[1], k.shape[1]
    out, lse = attend(fold_query_groups(q, hkv), k, v, scale, causal=False)
    return unfold_query_groups(out, hq), unfold_query_groups(lse, hq)


def attend_causal_chunk(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk over itself, causal; K/V are only c tokens, so repeating them per query head is cheap."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return attend(q, k, v, scale, causal=True)


def received_attention(
    q_local: torch.Tensor,
    window_keys: torch.Tensor,
    chunk_keys: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention probability each local key receives from the chunk's queries, summed over queries and heads.

    q_local (1,Hq,c,D) at local positions; window_keys (1,Hkv,W,D) and chunk_keys (1,Hkv,c,D) rotated;
    lse (1,Hq,c) the final log-normaliser of each query. A chunk key receives only from queries at or after
    it. -> (W+c,) fp32
    """
    hkv, c = window_keys.shape[1], q_local.shape[2]
    qf = fold_query_groups(q_local, hkv)[0].float()  # (Hkv, G*c, D)
    neg_lse = -fold_query_groups(lse[..., None], hkv)[0].float()  # (Hkv, G*c, 1)
    window = torch.baddbmm(neg_lse, qf, window_keys[0].float().transpose(1, 2), alpha=scale).exp_()
    chunk = torch.baddbmm(neg_lse, qf, chunk_keys[0].float().transpose(1, 2), alpha=scale).exp_()
    groups = qf.shape[1] // c
    visible = torch.ones(c, c, dtype=torch.bool, device=qf.device).tril().repeat(groups, 1)  # (G*c, c)
    chunk = chunk * visible
    return torch.cat((window.sum(dim=(0, 1)), chunk.sum(dim=(0, 1))))


def episodic_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered with transformers' AttentionInterface (same signature as sdpa's)."""
    context = kwargs.get("emllm_context")
    if context is None:
        msg = "the 'emllm' attention implementation needs an emllm_context; run the model through emllm.EMLLM"
        raise RuntimeError(msg)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    layer: LayerMemory = context.layers[module.layer_idx]
    out = layer.attend(query, key, value, scale, context)  # (1,Hq,c,D)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Episodic attention builds its own structure; transformers need not build a causal mask."""
    return None


def register_attention() -> None:
    """Register "emllm" with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, episodic_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


__all__ = [
    "ATTENTION_NAME",
    "attend",
    "attend_causal_chunk",
    "attend_grouped",
    "attend_reference",
    "episodic_attention",
    "merge_partials",
    "received_attention",
    "register_attention",
    "set_attention_backend",
    "use_triton_kernels",
]
