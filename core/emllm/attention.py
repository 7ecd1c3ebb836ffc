"""Episodic attention on torch: init + retrieved events + local window, each part with its own positions,
merged by log-sum-exp. The CPU path, and the reference the Triton kernels are tested against.

Per layer and chunk of c new tokens (window of W older tokens, relative positions 0..W+c-1):
  global part : queries rotated to `memory_distance`, init and retrieved keys at position 0 (or, with
                memory_positions="ordered", the G global keys at 0..G-1 and the queries at G+W..G+W+c-1)
  local part  : queries at W..W+c-1 over the window keys at 0..W-1 (no mask)
  chunk part  : the chunk over itself, causal
Each part returns (output, lse); `merge_partials` combines them exactly as one softmax would.

`episodic_attention_torch` and `received_mass_torch` take the arguments of the fused kernels in
`emllm_kernels` and return what they return (event scores use the kernels' own torch reference);
`attention_path` picks one set or the other once per layer (`EMLLMConfig.kernels`), so a layer has one
code path whichever runs it.
Knows nothing about segmentation, sessions or transformers (the hook is in emllm.hook).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import emllm_kernels
import torch
from emllm_kernels import fold_query_groups, unavailable_reason, unfold_query_groups

from .errors import ConfigError

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


def episodic_attention_torch(
    q_mem: torch.Tensor,
    q_local: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    scale: float,
    window_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """emllm_kernels.episodic_attention on torch: q_* (1,Hq,c,D) rotated for the global and local parts,
    k/v_global (1,Hkv,G,D), k/v_local (1,Hkv,W+c,D) the window then the chunk -> out (1,Hq,c,D), lse."""
    parts = []
    if k_global.shape[2]:
        parts.append(attend_grouped(q_mem, k_global, v_global, scale))
    if k_local.shape[2] - window_len == 1:  # one query sees every local key: one unmasked part
        parts.append(attend_grouped(q_local, k_local, v_local, scale))
    else:
        if window_len:
            window = (k_local[:, :, :window_len], v_local[:, :, :window_len])
            parts.append(attend_grouped(q_local, *window, scale))
        parts.append(
            attend_causal_chunk(q_local, k_local[:, :, window_len:], v_local[:, :, window_len:], scale)
        )
    return merge_partials(parts)


def received_mass_torch(
    q_local: torch.Tensor, k_local: torch.Tensor, lse: torch.Tensor, scale: float, window_len: int
) -> torch.Tensor:
    """emllm_kernels.received_mass on torch: -> (1, W+c) attention mass each local key received."""
    return received_attention(q_local, k_local[:, :, :window_len], k_local[:, :, window_len:], lse, scale)[
        None
    ]


@dataclass(frozen=True)
class AttentionPath:
    """The functions one layer runs: the fused Triton kernels, or the torch path with their signatures."""

    kernels: bool
    attention: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    received_mass: Callable[..., torch.Tensor]
    event_scores: Callable[..., torch.Tensor]


TORCH_PATH = AttentionPath(
    False, episodic_attention_torch, received_mass_torch, emllm_kernels.event_scores_reference
)
KERNEL_PATH = AttentionPath(
    True, emllm_kernels.episodic_attention, emllm_kernels.received_mass, emllm_kernels.event_scores
)


def attention_path(choice: str, device: torch.device | str, head_dim: int) -> AttentionPath:
    """The path EMLLMConfig.kernels asks for, for one layer's tensors (see use_triton_kernels)."""
    return KERNEL_PATH if use_triton_kernels(choice, device, head_dim) else TORCH_PATH


__all__ = [
    "KERNEL_PATH",
    "TORCH_PATH",
    "AttentionPath",
    "attend",
    "attend_causal_chunk",
    "attend_grouped",
    "attend_reference",
    "attention_path",
    "episodic_attention_torch",
    "merge_partials",
    "received_attention",
    "received_mass_torch",
    "set_attention_backend",
    "use_triton_kernels",
]
