"""A model's fingerprint: what a saved session must match before it is reopened.

Keys and values of a session are only meaningful to the model that computed them, so a session file
records the architecture, the compute dtype, the tokenizer's vocabulary and a checksum of the weights.
Hashing every weight of an 8B model would take a minute, so each tensor contributes its name, shape and
an evenly spaced sample of at most SAMPLE values: any fine-tune or different checkpoint changes them.
"""

from __future__ import annotations

import hashlib
import json

import torch

SAMPLE = 4096
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_parameters",
    "rope_theta",
    "partial_rotary_factor",
    "max_position_embeddings",
)


def model_fingerprint(model: torch.nn.Module, tokenizer, dtype: torch.dtype) -> str:
    """A hex digest identifying (architecture, dtype, vocabulary, weights)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    arch = {key: getattr(config, key, None) for key in ARCHITECTURE_KEYS}
    digest.update(json.dumps(arch, sort_keys=True, default=str).encode())
    digest.update(str(dtype).encode())
    digest.update(_vocabulary_digest(tokenizer))
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel() > SAMPLE:
                # integer steps: a float32 linspace rounds the last index up past the end on large tensors
                index = torch.arange(SAMPLE, device=flat.device) * (flat.numel() - 1) // (SAMPLE - 1)
                flat = flat[index]
            digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def _vocabulary_digest(tokenizer) -> bytes:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return type(tokenizer).__name__.encode()
    vocab = sorted(get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).digest()


__all__ = ["model_fingerprint"]
