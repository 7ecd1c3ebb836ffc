"""A tiny random chat engine (SmolLM2's tokenizer and chat template, random weights) registered for the
LangChain adapter under TINY_MODEL, so `ChatEMLLM(model=TINY_MODEL)` runs without the real model."""

from __future__ import annotations

import pytest

TINY_MODEL = "tiny-smollm2-langchain"
TINY_CONFIG = dict(n_init=4, n_local=64, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16)


def build_tiny_engine(tokenizer, name: str = TINY_MODEL, **store):
    from conftest import tiny_smol_model
    from emllm import EMLLM, EMLLMConfig

    return EMLLM(tiny_smol_model(tokenizer), tokenizer, EMLLMConfig(**TINY_CONFIG), name=name, **store)


@pytest.fixture(scope="module")
def tiny_chat_engine(smol_tokenizer):
    """The tiny engine, registered with the LangChain adapter as TINY_MODEL."""
    from emllm_integrations.langchain import register_engine

    engine = build_tiny_engine(smol_tokenizer)
    register_engine(engine)
    return engine
