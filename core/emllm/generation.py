"""Decoding helpers: next-token choice (greedy, temperature, top-k, top-p), incremental detokenisation
and stop strings. Knows nothing about attention or memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class GenerationConfig(BaseModel):
    """How `Session.generate` / `Session.stream` decode."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=256, ge=1, description="Upper bound on generated tokens.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy.")
    top_k: int = Field(default=0, ge=0, description="Sample among the k most likely tokens (0 = all).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: list[str] = Field(
        default_factory=list,
        description="Stop before the first occurrence of any of these (non-empty strings).",
    )
    seed: int | None = Field(default=None, description="Seed for sampling (reproducible output).")
    ignore_eos: bool = Field(
        default=False, description="Keep generating past end-of-sequence (for benchmarks)."
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):  # "" occurs everywhere: it would stop before the first character
            raise ValueError(f"stop strings must not be empty, got {stop!r}")
        return stop


def choose_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """Next token from logits (V,)."""
    if config.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = (
            cumulative - torch.softmax(sorted_scores, dim=-1) >= config.top_p
        )  # keep the token that crosses p
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class TextAccumulator:
    """Generated token ids -> text pieces, holding back incomplete characters and stop-string prefixes."""

    tokenizer: object
    stop: list[str]
    prompt_ids: list[int]
    _ids: list[int] = None  # type: ignore[assignment]
    _emitted: int = 0
    stopped: bool = False

    def __post_init__(self):
        self._ids = []
        # decode with a little left context so leading spaces of the first token survive
        self._context = self.prompt_ids[-4:]
        self._context_len = 0
        self._context_len = len(self._decode([]))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self._context + ids, skip_special_tokens=True)[self._context_len :]

    @property
    def text(self) -> str:
        return self._decode(self._ids)

    def add(self, token_id: int) -> str:
        """Add a token; return the newly safe text (possibly empty)."""
        self._ids.append(token_id)
        text = self.text
        for stop in self.stop:
            at = text.find(stop)
            if at != -1:
                self.stopped = True
                return self._emit(text[:at])
        if text.endswith("\ufffd"):
            return ""
        held = max((_suffix_prefix_len(text, s) for s in self.stop), default=0)
        return self._emit(text[: len(text) - held])

    def flush(self) -> str:
        """Text held back at the end of generation (an unfinished stop-string prefix)."""
        return "" if self.stopped else self._emit(self.text.rstrip("\ufffd"))

    def _emit(self, text: str) -> str:
        piece = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return piece


def _suffix_prefix_len(text: str, stop: str) -> int:
    """Longest k such that text ends with stop[:k] (k < len(stop))."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


__all__ = ["GenerationConfig", "TextAccumulator", "choose_token"]
