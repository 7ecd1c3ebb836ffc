"""EMLLM: one loaded decoder driven by episodic attention, holding any number of sessions.

The engine owns the model, the tokenizer and the rotary table; sessions own their memory. Forwards are
serialised per engine (one model, one forward at a time); each session has its own lock.
"""

from __future__ import annotations

import threading
import uuid

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .attention import ATTENTION_NAME, register_attention
from .config import EMLLMConfig
from .errors import SessionNotFoundError
from .memory import ChunkContext
from .models import DEFAULT_MODEL, check_supported, load_model
from .positions import RotaryTable, find_rotary_embedding
from .session import Session


def default_config(name: str) -> EMLLMConfig:
    """The preset for the bundled model; the library defaults otherwise."""
    if "smollm2" in name.lower():
        return EMLLMConfig.preset("smollm2-135m")
    return EMLLMConfig()


class EMLLM:
    """A Hugging Face decoder with EM-LLM episodic memory.

    >>> engine = EMLLM.from_pretrained()              # the bundled SmolLM2-135M-Instruct
    >>> chat = engine.session("alice")
    >>> chat.feed(open("novel.txt").read())
    >>> chat.generate("Who is Mr. Darcy?", max_new_tokens=40)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EMLLMConfig | None = None,
        name: str | None = None,
    ):
        check_supported(model)
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.config = config or default_config(self.name)
        self.config.check_against_model(getattr(model.config, "max_position_embeddings", None), self.name)
        register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        text_config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        )
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = text_config.num_key_value_heads or text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.max_position_embeddings = getattr(text_config, "max_position_embeddings", None)
        self.rotary = RotaryTable(find_rotary_embedding(model), self.config.memory_distance + 1, self.device)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._forward_lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        config: EMLLMConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> EMLLM:
        """Load a model (HF id, directory, .gguf file, or "smollm2-135m-instruct") with episodic memory."""
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, config=config, name=name_or_path)

    # -- sessions ---------------------------------------------------------------------------------
    def session(self, id: str | None = None, *, create: bool = True) -> Session:
        """The session with this id (created unless create=False); no id gives a new throwaway session."""
        with self._sessions_lock:
            if id is None:
                return Session(self, f"tmp-{uuid.uuid4().hex[:12]}")
            if id not in self._sessions:
                if not create:
                    msg = f"no session {id!r} in this engine (sessions: {sorted(self._sessions) or 'none'})"
                    raise SessionNotFoundError(msg)
                self._sessions[id] = Session(self, id)
            return self._sessions[id]

    def session_ids(self) -> list[str]:
        with self._sessions_lock:
            return sorted(self._sessions)

    def drop_session(self, id: str) -> None:
        """Forget a session and free its memory."""
        with self._sessions_lock:
            if id not in self._sessions:
                raise SessionNotFoundError(f"no session {id!r} in this engine")
            del self._sessions[id]

    # -- model ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def run_model(self, token_ids: list[int], context: ChunkContext, all_logits: bool) -> torch.Tensor:
        """One forward of a chunk through episodic attention -> logits (T or 1, V) fp32."""
        ids = torch.tensor([token_ids], device=self.device)
        with self._forward_lock, torch.inference_mode():
            out = self.model(
                input_ids=ids,
                position_ids=torch.zeros_like(ids),  # the model's own RoPE becomes the identity
                use_cache=False,
                logits_to_keep=0 if all_logits else 1,
                emllm_context=context,
            )
        return out.logits[0].float()


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


__all__ = ["EMLLM", "default_config"]
