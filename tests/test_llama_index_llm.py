"""The LlamaIndex EMLLM contract on a tiny random model over SmolLM2's tokenizer and chat template: every
method sync / async / streaming, metadata, token counts, sessions and prefix reuse, tool calling
(constrained when required; a required call the token budget cuts short selects no tool), structured
output, and the FunctionAgent / ReActAgent loops. Calls that must finish use the terse model (biased
toward JSON's closers): random weights alone never end a string, and the budget does not end it for them."""

from __future__ import annotations

import emllm
import pytest
from emllm import TokenBudgetError
from emllm.chat import InvalidToolCall, ToolCall
from emllm.chat_session import ChatReply, ChatSession, ChatUsage
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.chat_engine.types import AgentChatResponse
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context
from pydantic import BaseModel

from emllm_integrations.llama_index import EMLLM
from emllm_integrations.llama_index._budget import UNBOUNDED_CONTEXT
from emllm_integrations.llama_index._chat import assistant_message, to_emllm_messages, tool_specs

PROMPT = "The capital of France is"
MESSAGES = [
    ChatMessage(role="system", content="You are terse."),
    ChatMessage(role="user", content="Name a colour."),
]


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture
def llm(make_smol_engine):
    return EMLLM(engine=make_smol_engine(), max_new_tokens=6)


@pytest.fixture
def terse_llm(make_smol_engine, smol_tokenizer):
    from conftest import tiny_smol_model

    return EMLLM(engine=make_smol_engine(model=tiny_smol_model(smol_tokenizer, terse=True)), max_new_tokens=6)


@pytest.fixture
def tools():
    return [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(weather)]


def _usage(response):
    return response.raw["usage"]


# -- metadata and options ---------------------------------------------------------------------------
def test_public_api():
    import emllm_integrations.llama_index as module

    assert module.__all__ == ["EMLLM", "EpisodicMemoryBlock", "EpisodicQueryEngine"]


def test_metadata_reports_the_episodic_context(llm):
    meta = llm.metadata
    assert isinstance(llm, FunctionCallingLLM) and EMLLM.class_name() == "EMLLM"
    assert meta.context_window == UNBOUNDED_CONTEXT > llm.engine.max_position_embeddings
    assert meta.num_output == 6 and meta.model_name == "tiny-smollm2"
    assert meta.is_chat_model and meta.is_function_calling_model
    assert EMLLM(engine=llm.engine, context_window=4096).metadata.context_window == 4096


def test_bad_options_and_prompts_are_refused(llm):
    with pytest.raises(TypeError, match="unknown options \\['beam_width'\\]"):
        llm.complete(PROMPT, beam_width=4)
    with pytest.raises(emllm.EmptyInputError):
        llm.complete("")
    with pytest.raises(ValueError, match="config and store"):
        EMLLM(engine=llm.engine, config=emllm.EMLLMConfig())
    assert _usage(llm.complete(PROMPT, max_tokens=2))["completion_tokens"] <= 2


# -- completion -------------------------------------------------------------------------------------
def test_complete_counts_tokens_and_reuses_the_prompt(llm):
    counter = TokenCountingHandler(tokenizer=llm.engine.encode)
    llm.callback_manager = CallbackManager([counter])
    n_prompt = len(llm.engine.encode(PROMPT))

    first = llm.complete(PROMPT)
    second = llm.complete(PROMPT)
    assert first.text and second.text == first.text  # greedy, same prompt, same state
    assert _usage(first) == {**_usage(first), "prompt_tokens": n_prompt, "cached_tokens": 0}
    assert 1 <= _usage(first)["completion_tokens"] <= 6
    assert _usage(second)["cached_tokens"] == n_prompt  # the session already held the prompt
    assert second.additional_kwargs == _usage(second)
    assert counter.prompt_llm_token_count == 2 * n_prompt  # LlamaIndex reads our counts, not its own
    assert counter.completion_llm_token_count == 2 * _usage(first)["completion_tokens"]


def test_stream_complete_matches_complete(llm):
    text = llm.complete(PROMPT).text
    chunks = list(llm.stream_complete(PROMPT))
    assert "".join(c.delta for c in chunks) == text and chunks[-1].text == text
    assert [c.text for c in chunks] == sorted((c.text for c in chunks), key=len)  # text accumulates
    assert _usage(chunks[-1])["completion_tokens"] >= 1


async def test_async_completion_matches_sync(llm):
    text = llm.complete(PROMPT).text
    assert (await llm.acomplete(PROMPT)).text == text
    chunks = [chunk async for chunk in await llm.astream_complete(PROMPT)]
    assert "".join(c.delta for c in chunks) == text


# -- chat -------------------------------------------------------------------------------------------
async def test_every_chat_method_gives_the_same_reply(llm):
    reply = llm.chat(MESSAGES)
    assert reply.message.role == MessageRole.ASSISTANT and reply.message.content
    streamed = list(llm.stream_chat(MESSAGES))
    assert "".join(c.delta for c in streamed) == reply.message.content == streamed[-1].message.content
    assert (await llm.achat(MESSAGES)).message.content == reply.message.content
    astreamed = [c async for c in await llm.astream_chat(MESSAGES)]
    assert "".join(c.delta for c in astreamed) == reply.message.content
    usage = _usage(astreamed[-1])
    assert usage == {**_usage(reply), "cached_tokens": usage["prompt_tokens"]}  # the 2nd to 4th reuse it


def test_a_resent_history_is_read_once(llm):
    first = llm.chat(MESSAGES)
    history = [
        *MESSAGES,
        ChatMessage(role="assistant", content="Blue."),
        ChatMessage(role="user", content="Why?"),
    ]
    second = llm.chat(history)
    assert _usage(second)["cached_tokens"] == _usage(first)["prompt_tokens"]  # up to the assistant's reply
    assert llm.session().stats().tokens_reused >= _usage(first)["prompt_tokens"]


def test_sessions_keep_conversations_apart(llm):
    llm.chat(MESSAGES, session_id="alice")
    llm.chat([ChatMessage(role="user", content="Hello")], session_id="bob")
    assert {"alice", "bob"} <= set(llm.engine.session_ids())
    assert _usage(llm.chat(MESSAGES, session_id="alice"))["cached_tokens"] > 0

    throwaway = EMLLM(engine=llm.engine, session_id=None, max_new_tokens=2)
    throwaway.chat(MESSAGES)
    assert _usage(throwaway.chat(MESSAGES))["cached_tokens"] == 0  # a fresh session every call


# -- tools ------------------------------------------------------------------------------------------
def test_a_required_tool_call_is_valid_even_from_random_weights(terse_llm, tools):
    llm = terse_llm
    response = llm.chat_with_tools(
        tools, user_msg="What is 6 times 7?", tool_required=True, max_new_tokens=64
    )
    calls = llm.get_tool_calls_from_response(response)
    assert len(calls) == 1 and calls[0].tool_name in {"multiply", "weather"}
    tool = {t.metadata.name: t for t in tools}[calls[0].tool_name]
    assert tool(**calls[0].tool_kwargs).is_error is False  # arguments fit the tool's schema
    assert any(isinstance(b, ToolCallBlock) for b in response.message.blocks)


def test_tool_choice_picks_the_tool_or_none(terse_llm, tools):
    llm = terse_llm
    response = llm.chat_with_tools(tools, user_msg="Weather?", tool_choice="weather", max_new_tokens=64)
    assert [c.tool_name for c in llm.get_tool_calls_from_response(response)] == ["weather"]
    forced = {"type": "function", "function": {"name": "multiply"}}
    response = llm.chat_with_tools(tools, user_msg="6 x 7?", tool_choice=forced, max_new_tokens=64)
    assert [c.tool_name for c in llm.get_tool_calls_from_response(response)] == ["multiply"]

    with_tools = llm.chat_with_tools(tools, user_msg="Hi")
    without = llm.chat_with_tools(tools, user_msg="Hi", tool_choice="none")
    assert _usage(without)["prompt_tokens"] < _usage(with_tools)["prompt_tokens"]  # tools not offered
    with pytest.raises(ValueError, match="names no bound tool"):
        llm.chat_with_tools(tools, user_msg="Hi", tool_choice="divide")


def test_predict_and_call_and_structured_output(terse_llm, tools):
    llm = terse_llm
    result = llm.predict_and_call(tools[:1], user_msg="What is 6 times 7?", tool_required=True, max_tokens=64)
    assert isinstance(result, AgentChatResponse) and len(result.sources) == 1
    assert result.sources[0].tool_name == "multiply" and not result.sources[0].is_error

    from llama_index.core.prompts import PromptTemplate

    person = llm.structured_predict(
        Person, PromptTemplate("Describe {who}."), llm_kwargs={"max_tokens": 64}, who="a famous author"
    )
    assert isinstance(person, Person)  # constrained to the schema, so it parses once finished


# -- the token budget never makes up arguments (issue 19) ---------------------------------------------
def test_a_required_call_cut_short_selects_no_tool(llm, tools):
    """Random weights write 15-digit numbers: 30 tokens cannot hold the call they are writing."""
    response = llm.chat_with_tools(
        tools[:1], user_msg="What is 6 x 7?", tool_required=True, max_new_tokens=30
    )
    assert not any(isinstance(b, ToolCallBlock) for b in response.message.blocks)
    extra = response.message.additional_kwargs
    assert extra["finish_reason"] == "length"
    (invalid,) = extra["invalid_tool_calls"]
    assert invalid["name"] == "multiply" and "token budget ran out" in invalid["error"]
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(TokenBudgetError, match="token budget ran out") as caught:
        llm.get_tool_calls_from_response(response)
    assert isinstance(caught.value, emllm.EMLLMError) and isinstance(caught.value, ValueError)


def test_predict_and_call_and_structured_predict_cut_short_raise(llm, tools):
    with pytest.raises(TokenBudgetError, match="token budget ran out"):
        llm.predict_and_call(tools[:1], user_msg="What is 6 x 7?", tool_required=True, max_tokens=30)
    from llama_index.core.prompts import PromptTemplate

    with pytest.raises(TokenBudgetError, match="token budget ran out"):
        llm.structured_predict(
            Person, PromptTemplate("Describe {who}."), llm_kwargs={"max_tokens": 30}, who="x"
        )


def test_tool_calls_come_back_as_blocks_and_render_back(llm, tools):
    call = ToolCall("multiply", {"a": 6, "b": 7}, "call_1")
    usage = ChatUsage(10, 5, 0)
    message = assistant_message(ChatReply("Let me see.", [call], [], "", "tool_calls", usage))
    assert message.content == "Let me see." and message.additional_kwargs["finish_reason"] == "tool_calls"
    [selection] = llm.get_tool_calls_from_response(ChatResponse(message=message))
    assert (selection.tool_id, selection.tool_name, selection.tool_kwargs) == (
        "call_1",
        "multiply",
        {"a": 6, "b": 7},
    )

    broken = InvalidToolCall("multiply", '{"a": 6', "not JSON")
    failed = assistant_message(ChatReply("", [], [broken], "", "stop", usage))
    assert failed.additional_kwargs["invalid_tool_calls"][0]["name"] == "multiply"
    with pytest.raises(ValueError, match="expected at least one tool call"):
        llm.get_tool_calls_from_response(ChatResponse(message=failed))

    result = ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "call_1"})
    history = to_emllm_messages([ChatMessage(role="user", content="6 x 7?"), message, result])
    assert history[1].tool_calls == (call,) and history[2].name == "multiply"  # results named after calls
    rendered = ChatSession.of(llm.session()).render(history, tool_specs(tools))
    assert '{"name": "multiply", "arguments": {"a": 6, "b": 7}}' in rendered
    assert "<tool_response>" in rendered and '"content": 42' in rendered


def test_only_the_first_call_is_kept_unless_parallel_calls_are_allowed(llm, tools):
    blocks = [
        TextBlock(text=""),
        ToolCallBlock(tool_call_id="1", tool_name="multiply", tool_kwargs={"a": 1, "b": 2}),
        ToolCallBlock(tool_call_id="2", tool_name="weather", tool_kwargs={"city": "Bath"}),
    ]

    def calls_kept(parallel):
        response = ChatResponse(message=ChatMessage(role="assistant", blocks=list(blocks)))
        validated = llm._validate_chat_with_tools_response(
            response, tools, allow_parallel_tool_calls=parallel
        )
        return len(llm.get_tool_calls_from_response(validated))

    assert calls_kept(parallel=True) == 2 and calls_kept(parallel=False) == 1


# -- agents -----------------------------------------------------------------------------------------
async def test_function_agent_calls_the_forced_tool_then_answers(terse_llm, tools):
    llm = EMLLM(engine=terse_llm.engine, max_new_tokens=64)
    agent = FunctionAgent(
        tools=tools[:1], llm=llm, initial_tool_choice="multiply", system_prompt="Use tools."
    )
    handler = agent.run("What is 6 times 7?")
    results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
    output = await handler
    assert [r.tool_name for r in results] == ["multiply"] and not results[0].tool_output.is_error
    assert output.response.role == MessageRole.ASSISTANT
    assert llm.session().stats().tokens_reused > 0  # the second step re-sent the first: read once


async def test_function_agent_never_runs_a_tool_on_cut_short_arguments(make_smol_engine, tools):
    """The issue: with a small max_new_tokens the agent ran multiply(0, 0). Now no tool runs."""
    llm = EMLLM(engine=make_smol_engine(), max_new_tokens=30)
    agent = FunctionAgent(tools=tools[:1], llm=llm, initial_tool_choice="multiply")
    handler = agent.run("What is 6 times 7?")
    results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
    output = await handler
    assert results == [] and output.tool_calls == []
    (invalid,) = output.response.additional_kwargs["invalid_tool_calls"]
    assert "token budget ran out" in invalid["error"]


async def test_react_agent_runs_on_any_model(make_smol_engine, tools):
    llm = EMLLM(engine=make_smol_engine(), max_new_tokens=12)
    agent = ReActAgent(tools=tools, llm=llm, early_stopping_method="generate")
    ctx = Context(agent)
    first = await agent.run("What is 6 times 7?", ctx=ctx, max_iterations=2)
    read = llm.session().stats().tokens_computed
    second = await agent.run("And 3 times 5?", ctx=ctx, max_iterations=2)
    assert first.response.role == second.response.role == MessageRole.ASSISTANT
    # the second turn re-sends the ReAct header (tool descriptions) and the first turn: read once
    assert llm.session().stats().tokens_reused > 0.5 * read
