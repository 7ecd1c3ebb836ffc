"""EMLLM: one loaded decoder driven by episodic attention, holding any number of sessions.

The engine owns the model, the tokenizer and the rotary table; sessions own their memory. Forwards are
serialised per engine (one model, one forward at a time); each session has its own lock.
"""

from __future__ import annotations

import os
import threading
import uuid

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import EMLLMConfig
from .errors import SessionNotFoundError
from .fingerprint import model_fingerprint
from .hook import ATTENTION_NAME, register_attention
from .memory import ChunkContext
from .models import DEFAULT_MODEL, check_supported, load_model
from .positions import RotaryTable, find_rotary_embedding
from .session import Session
from .store import SessionStore


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
        store: SessionStore | str | os.PathLike | None = None,
    ):
        check_supported(model)
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.config = config or default_config(self.name)
        text_config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        )
        self.num_layers = text_config.num_hidden_layers
        self.config.check_against_model(
            getattr(model.config, "max_position_embeddings", None), self.name, self.num_layers
        )
        register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_kv_heads = text_config.num_key_value_heads or text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.max_position_embeddings = getattr(text_config, "max_position_embeddings", None)
        self.rotary = RotaryTable(find_rotary_embedding(model), self.config.position_span, self.device)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._forward_lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self.store = store if isinstance(store, SessionStore) or store is None else SessionStore(store)
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        config: EMLLMConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        store: SessionStore | str | os.PathLike | None = None,
    ) -> EMLLM:
        """Load a model (HF id, directory, .gguf file, or "smollm2-135m-instruct") with episodic memory.

        With a `store` (a SessionStore or a folder), sessions with an id persist: `session(id)` reopens a
        saved one and `Session.save()` writes it.
        """
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, config=config, name=name_or_path, store=store)

    @property
    def fingerprint(self) -> str:
        """Identifies model weights, architecture, dtype and vocabulary (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.tokenizer, self.dtype)
        return self._fingerprint

    # -- sessions ---------------------------------------------------------------------------------
    def session(self, id: str | None = None, *, create: bool = True) -> Session:
        """The session with this id (created unless create=False); no id gives a new throwaway session.

        With a store, a saved session of this id is reopened (and locked for this engine).
        """
        with self._sessions_lock:
            if id is None:
                return Session(self, f"tmp-{uuid.uuid4().hex[:12]}")
            if id not in self._sessions:
                stored = self.store is not None and id in self.store
                if not create and not stored:
                    known = sorted(self._sessions_and_stored()) or "none"
                    raise SessionNotFoundError(f"no session {id!r} in this engine (sessions: {known})")
                session = Session(self, id)
                if self.store is not None:
                    self.store.attach(session)
                self._sessions[id] = session
            return self._sessions[id]

    def session_ids(self) -> list[str]:
        """Sessions open in this engine and, with a store, those saved in it."""
        with self._sessions_lock:
            return sorted(self._sessions_and_stored())

    def _sessions_and_stored(self) -> set[str]:
        stored = {s.id for s in self.store.list()} if self.store is not None else set()
        return set(self._sessions) | stored

    def drop_session(self, id: str, *, delete: bool = False) -> None:
        """Close a session and free its memory; with delete=True also remove it from the store."""
        with self._sessions_lock:
            open_here = id in self._sessions
            stored = self.store is not None and id in self.store
            if not open_here and not (delete and stored):
                raise SessionNotFoundError(f"no session {id!r} in this engine")
            self._sessions.pop(id, None)
            if self.store is not None:
                self.store.unlock(id)
                if delete and stored:
                    self.store.delete(id)

    def close(self) -> None:
        """Close every session (releasing their store locks); saved data stays on disk."""
        with self._sessions_lock:
            if self.store is not None:
                for id in self._sessions:
                    self.store.unlock(id)
            self._sessions.clear()

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
