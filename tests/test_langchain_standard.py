"""langchain-tests standard suites for ChatEMLLM, on a tiny random model over SmolLM2's tokenizer.

Random weights write gibberish, so what these prove is the plumbing: messages, tools and tool results
rendered, forced tool calls and structured output decoded under their JSON schema, streaming, async,
batching and usage. The model is the terse one (biased toward JSON's closers): the token budget never
closes a document for the model, and random weights alone would never end a string. Tests that need the
model to understand the request are xfailed.
"""

from __future__ import annotations

import pytest
from langchain_fixtures import TERSE_MODEL, terse_chat_engine  # noqa: F401  (fixture)
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from emllm_integrations.langchain import ChatEMLLM

PARAMS = {"model": TERSE_MODEL, "max_tokens": 64}  # the unit suite sets max_tokens itself
RANDOM_WEIGHTS = "random weights: the tiny test model cannot read a value or a choice off the request"


@pytest.fixture(autouse=True)
def _engine(terse_chat_engine):  # noqa: F811
    return terse_chat_engine


class TestChatEMLLMUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatEMLLM]:
        return ChatEMLLM

    @property
    def chat_model_params(self) -> dict:
        return {"model": TERSE_MODEL}


class TestChatEMLLMIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatEMLLM]:
        return ChatEMLLM

    @property
    def chat_model_params(self) -> dict:
        return dict(PARAMS)

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False):
        model = ChatEMLLM(**PARAMS, session_id="cache-read-check")
        history = [("human", "Hello, how are you?")]
        model.invoke(history)
        history += [("ai", "Fine."), ("human", "And now?")]
        if not stream:
            return model.invoke(history)
        full = None
        for chunk in model.stream(history):
            full = chunk if full is None else full + chunk
        return full

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (asserts args == {'input': 3})")
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (asserts args == {'input': 3})")
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (the tool is not forced: the model must choose to call it)")
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (asserts a non-empty answer_style; it may write '')")
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (asserts the customer name is copied from the request)")
    def test_unicode_tool_call_integration(self, model, *, tool_choice=None, force_tool_call=True) -> None:
        super().test_unicode_tool_call_integration(
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )
