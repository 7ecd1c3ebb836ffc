"""LangChain integration of EM-LLM: `ChatEMLLM` (chat model with tools, structured output and episodic
threads) and `EMLLM` (completion LLM), both over a local Hugging Face decoder with unbounded context.

Docs write the engine as `emllm.EMLLM`; `emllm_integrations.langchain.EMLLM` is the LangChain LLM.
"""

from ._engines import get_engine, register_engine
from .chat_models import ChatEMLLM
from .llms import EMLLM

__all__ = ["EMLLM", "ChatEMLLM", "get_engine", "register_engine"]
