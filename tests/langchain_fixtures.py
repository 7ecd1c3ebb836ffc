"""Tiny random chat engines (SmolLM2's tokenizer and chat template, random weights) registered for the
LangChain adapter, so `ChatEMLLM(model=TINY_MODEL)` runs without the real model.

TERSE_MODEL is the same model biased toward JSON's closers (`conftest.prefer_closers`): under constrained
decoding it finishes forced tool calls and structured output by its own choice, where random weights
alone would write one string until the token budget runs out.
"""

from __future__ import annotations

import pytest

TINY_MODEL = "tiny-smollm2-langchain"
TERSE_MODEL = "tiny-smollm2-langchain-terse"
TINY_CONFIG = dict(n_init=4, n_local=64, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16)


def build_tiny_engine(tokenizer, name: str = TINY_MODEL, *, terse: bool = False, **store):
    from conftest import tiny_smol_model
    from emllm import EMLLM, EMLLMConfig

    model = tiny_smol_model(tokenizer, terse=terse)
    return EMLLM(model, tokenizer, EMLLMConfig(**TINY_CONFIG), name=name, **store)


@pytest.fixture(scope="module")
def tiny_chat_engine(smol_tokenizer):
    """The tiny engine, registered with the LangChain adapter as TINY_MODEL."""
    from emllm_integrations.langchain import register_engine

    engine = build_tiny_engine(smol_tokenizer)
    register_engine(engine)
    return engine


@pytest.fixture(scope="module")
def terse_chat_engine(smol_tokenizer):
    """The terse tiny engine, registered with the LangChain adapter as TERSE_MODEL."""
    from emllm_integrations.langchain import register_engine

    engine = build_tiny_engine(smol_tokenizer, TERSE_MODEL, terse=True)
    register_engine(engine)
    return engine
