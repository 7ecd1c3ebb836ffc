"""The transformers hook: episodic attention registered as the attention implementation "emllm".

transformers calls `transformers_attention` with its fixed signature for every attention layer; the state
of the call (each layer's memory, the positions, what to retrieve) arrives through the `emllm_context`
forward kwarg, and the layer's LayerMemory does the work. Knows nothing about sessions.
"""

from __future__ import annotations

import math

from .memory import ChunkContext

ATTENTION_NAME = "emllm"


def transformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered with transformers' AttentionInterface (the signature of its sdpa attention):
    query (1,Hq,c,D), key/value (1,Hkv,c,D) before RoPE (the model runs with position 0) -> (1,c,Hq,D)."""
    context: ChunkContext | None = kwargs.get("emllm_context")
    if context is None:
        msg = "the 'emllm' attention implementation needs an emllm_context; run the model through emllm.EMLLM"
        raise RuntimeError(msg)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = context.layers[module.layer_idx].attend(query, key, value, scale, context)  # (1,Hq,c,D)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Episodic attention builds its own structure; transformers need not build a causal mask."""
    return None


def register_attention() -> None:
    """Register "emllm" with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, transformers_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


__all__ = ["ATTENTION_NAME", "register_attention", "transformers_attention"]
