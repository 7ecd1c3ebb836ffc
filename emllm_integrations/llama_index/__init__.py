"""LlamaIndex adapters over the emllm engine: an LLM, a memory block and a query engine.

- `EMLLM`: a FunctionCallingLLM whose conversations live in episodic sessions (prefix reuse, persistence).
- `EpisodicMemoryBlock`: a `Memory` block that turns flushed chat history into episodic events.
- `EpisodicQueryEngine`: whole documents read once into episodic memory; answers cite retrieved events.
"""

from .llm import EMLLM
from .memory_block import EpisodicMemoryBlock
from .query_engine import EpisodicQueryEngine

__all__ = ["EMLLM", "EpisodicMemoryBlock", "EpisodicQueryEngine"]
