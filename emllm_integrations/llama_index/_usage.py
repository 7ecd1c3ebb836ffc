"""Token accounting for one call: what was read, reused from episodic memory, and generated.

Reported the way LlamaIndex's TokenCountingHandler reads it (`raw["usage"]` with prompt/completion
tokens), plus `cached_tokens`: prompt tokens the session already held and did not compute again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }


__all__ = ["Usage"]
