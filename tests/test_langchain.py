"""ChatEMLLM / EMLLM beyond the standard suites: episodic threads (prefix reuse, divergence, LangGraph
thread ids), tool histories, forced calls and structured output under a token budget, clear errors,
persistence across restarts, and an agent end to end."""

from __future__ import annotations

import json

import pytest
from emllm.chat import ChatFormatError
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_fixtures import (  # noqa: F401  (fixtures)
    TERSE_MODEL,
    TINY_MODEL,
    build_tiny_engine,
    terse_chat_engine,
    tiny_chat_engine,
)
from pydantic import BaseModel

from emllm_integrations.langchain import EMLLM, ChatEMLLM


@pytest.fixture
def engine(tiny_chat_engine):  # noqa: F811
    return tiny_chat_engine


@pytest.fixture
def chat(engine):
    return ChatEMLLM(model=TINY_MODEL, max_tokens=8)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def thread(name: str) -> dict:
    return {"configurable": {"thread_id": name}}


# -- episodic threads ------------------------------------------------------------------------------------
def test_resent_history_computes_only_the_new_suffix(chat, engine):
    history = [HumanMessage("Hello, who are you?")]
    first = chat.invoke(history, config=thread("reuse"))
    session = engine.session("reuse")
    held, before = session.stats().tokens, session.stats().tokens_computed
    history += [first, HumanMessage("Tell me more.")]
    second = chat.invoke(history, config=thread("reuse"))
    usage = second.usage_metadata
    new_prompt_tokens = usage["input_tokens"] - held
    assert new_prompt_tokens > 0
    # the held reply's last token is computed lazily; then the new suffix, then all but the last output
    assert session.stats().tokens_computed - before == new_prompt_tokens + usage["output_tokens"]
    assert usage["input_token_details"]["cache_read"] == held - 1
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_diverged_history_is_cut_back_to_the_common_prefix(chat, engine):
    chat.invoke(
        [HumanMessage("My name is Ann."), AIMessage("Hi Ann."), HumanMessage("Bye")], config=thread("div")
    )
    edited = [HumanMessage("My name is Bob."), AIMessage("Hi Bob."), HumanMessage("Bye")]
    reply = chat.invoke(edited, config=thread("div"))
    session = engine.session("div")
    assert (
        0 < reply.usage_metadata["input_token_details"]["cache_read"] < reply.usage_metadata["input_tokens"]
    )
    prompt = chat.episodic_engine().tokenizer.decode(session.token_ids)
    assert "Bob" in prompt and "Ann" not in prompt


def test_session_from_field_kwarg_or_config_and_throwaway_otherwise(engine):
    ChatEMLLM(model=TINY_MODEL, max_tokens=2, session_id="fixed").invoke("hi")
    ChatEMLLM(model=TINY_MODEL, max_tokens=2).invoke("hi", session_id="by-kwarg")
    ChatEMLLM(model=TINY_MODEL, max_tokens=2).invoke(
        "hi", config={"configurable": {"session_id": "by-config"}}
    )
    assert {"fixed", "by-kwarg", "by-config"} <= set(engine.session_ids())
    count = len(engine.session_ids())
    anonymous = ChatEMLLM(model=TINY_MODEL, max_tokens=2)
    anonymous.invoke("hi")
    assert anonymous.invoke("hi").usage_metadata["input_token_details"]["cache_read"] == 0
    assert len(engine.session_ids()) == count


def test_tool_round_trip_reuses_everything_before_the_result(terse_chat_engine):  # noqa: F811
    model = ChatEMLLM(model=TERSE_MODEL, max_tokens=64).bind_tools([add], tool_choice="add")
    history = [HumanMessage("What is 2 + 3?")]
    call = model.invoke(history, config=thread("tools"))
    assert call.tool_calls and call.tool_calls[0]["name"] == "add"
    assert set(call.tool_calls[0]["args"]) == {"a", "b"}
    held = terse_chat_engine.session("tools").stats().tokens
    history += [call, ToolMessage("5", tool_call_id=call.tool_calls[0]["id"], name="add")]
    after = (
        ChatEMLLM(model=TERSE_MODEL, max_tokens=4).bind_tools([add]).invoke(history, config=thread("tools"))
    )
    # the forced call was decoded canonically, so its re-rendering matches what the session holds
    assert after.usage_metadata["input_token_details"]["cache_read"] == held - 1


def test_stream_of_a_forced_call_ends_with_one_tool_call_chunk(terse_chat_engine):  # noqa: F811
    model = ChatEMLLM(model=TERSE_MODEL, max_tokens=64).bind_tools([add], tool_choice="any")
    chunks = list(model.stream("add 1 and 2"))
    assert chunks[-1].chunk_position == "last"
    full = sum(chunks[1:], chunks[0])
    assert [c["name"] for c in full.tool_calls] == ["add"]
    assert full.response_metadata["finish_reason"] == "tool_calls"


# -- the token budget never makes up arguments (issue 19) ------------------------------------------------
class Joke(BaseModel):
    setup: str
    punchline: str


@pytest.mark.parametrize("max_tokens", [30, 48])
@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_a_forced_call_cut_short_is_an_invalid_tool_call(engine, max_tokens, stream):
    """Random weights write 15-digit numbers, so the call is still open when max_tokens runs out."""
    model = ChatEMLLM(model=TINY_MODEL, max_tokens=max_tokens).bind_tools([add], tool_choice="any")
    if stream:
        chunks = list(model.stream("What is 6 x 7?"))
        message = sum(chunks[1:], chunks[0])
    else:
        message = model.invoke("What is 6 x 7?")
    assert message.tool_calls == []  # not a call with the digits so far, nor with made-up ones
    (invalid,) = message.invalid_tool_calls
    assert invalid["name"] == "add" and message.response_metadata["finish_reason"] == "length"
    raw = json.loads(invalid["args"]) if stream else invalid["args"]  # a stream sends it JSON-quoted
    assert raw.startswith('{"name": "add", "arguments": {"a": ')
    if not stream:  # LangChain's chunk merge keeps no error text
        assert f"token budget ran out (max_new_tokens={max_tokens})" in invalid["error"]


@pytest.mark.parametrize("max_tokens", [30, 34, 36, 64])
def test_the_budget_never_changes_a_forced_calls_arguments(terse_chat_engine, max_tokens):  # noqa: F811
    """The terse model's own call: its JSON takes 35 tokens here, its closing tag 7 more. With less
    room the call is invalid; with room for the JSON it is the very same call; never other arguments."""
    model = ChatEMLLM(model=TERSE_MODEL, max_tokens=200).bind_tools([add], tool_choice="any")
    own = model.invoke("What is 6 x 7?")
    tight = model.bind(max_tokens=max_tokens).invoke("What is 6 x 7?")
    if tight.tool_calls or max_tokens >= own.usage_metadata["output_tokens"] - 1:
        assert [c["args"] for c in tight.tool_calls] == [own.tool_calls[0]["args"]]
    else:
        assert "token budget ran out" in tight.invalid_tool_calls[0]["error"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("mode", ["invoke", "include_raw", "stream"])
def test_structured_output_cut_short_is_an_error_not_a_value(engine, method, mode):
    """Random weights never end a string: at 32 tokens the Joke is unfinished, and says so."""
    model = ChatEMLLM(model=TINY_MODEL, max_tokens=32)
    structured = model.with_structured_output(Joke, method=method, include_raw=mode == "include_raw")
    if mode == "include_raw":
        result = structured.invoke("Tell me a joke about cats.")
        assert result["parsed"] is None and isinstance(result["parsing_error"], OutputParserException)
        assert "token budget ran out" in str(result["parsing_error"])
        return
    with pytest.raises(OutputParserException, match="token budget ran out"):
        if mode == "stream":
            list(structured.stream("Tell me a joke about cats."))
        else:
            structured.invoke("Tell me a joke about cats.")


# -- errors ----------------------------------------------------------------------------------------------
def test_clear_errors_for_bad_input(chat):
    with pytest.raises(ChatFormatError, match="empty"):
        chat.invoke([])
    with pytest.raises(ChatFormatError, match="text only"):
        chat.invoke([HumanMessage([{"type": "image", "url": "http://x/y.png"}])])
    with pytest.raises(ValueError, match="names no bound tool"):
        chat.bind_tools([add], tool_choice="multiply")
    with pytest.raises(ValueError, match="unsupported arguments"):
        chat.with_structured_output({"type": "object"}, bogus=True)
    with pytest.raises(ValueError, match="extra"):
        ChatEMLLM(model=TINY_MODEL, temprature=0.5)
    with pytest.raises(ValueError, match="smallest"):
        ChatEMLLM(model=TINY_MODEL, max_tokens=2).with_structured_output(
            {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
        ).invoke("x")


def test_timeout_raises(chat):
    with pytest.raises(TimeoutError):
        ChatEMLLM(model=TINY_MODEL, max_tokens=50, timeout=0.0).invoke("hi")


def test_profile_says_input_is_unbounded(chat):
    import sys

    assert chat.profile["max_input_tokens"] == sys.maxsize
    assert chat.profile["tool_calling"] and chat.profile["structured_output"]


# -- completion LLM --------------------------------------------------------------------------------------
def test_completion_llm_reads_a_growing_prompt_once(engine):
    llm = EMLLM(model=TINY_MODEL, max_tokens=3, session_id="doc")
    first = llm.invoke("Chapter one. It was a dark and stormy night.")
    assert isinstance(first, str)
    session = engine.session("doc")
    before = session.stats().tokens_computed
    prompt = "Chapter one. It was a dark and stormy night." + first + " Chapter two."
    pieces = list(llm.stream(prompt))
    assert pieces
    new = len(engine.tokenizer.encode(" Chapter two.", add_special_tokens=False))
    assert session.stats().tokens_computed - before <= new + 1 + 3


async def test_async_completion_and_chat(engine):
    assert isinstance(await EMLLM(model=TINY_MODEL, max_tokens=2).ainvoke("Once"), str)
    pieces = [
        c async for c in ChatEMLLM(model=TINY_MODEL, max_tokens=3).astream("hi", config=thread("async"))
    ]
    assert pieces[-1].chunk_position == "last"


# -- persistence -----------------------------------------------------------------------------------------
def test_restart_reuses_the_saved_session(smol_tokenizer, tmp_path):
    history = [HumanMessage("Remember: the code word is heron.")]
    first_engine = build_tiny_engine(smol_tokenizer, name="tiny-persist", store=tmp_path)
    reply = ChatEMLLM(engine=first_engine, max_tokens=6).invoke(history, config=thread("p1"))
    held = first_engine.session("p1").stats().tokens
    first_engine.close()  # the process ends; its session files stay

    restarted = build_tiny_engine(smol_tokenizer, name="tiny-persist", store=tmp_path)
    assert "p1" in restarted.session_ids()
    session = restarted.session("p1")
    assert session.stats().tokens == held
    before = session.stats().tokens_computed
    history += [reply, HumanMessage("What is the code word?")]
    again = ChatEMLLM(engine=restarted, max_tokens=6).invoke(history, config=thread("p1"))
    usage = again.usage_metadata
    assert usage["input_token_details"]["cache_read"] == held - 1
    assert session.stats().tokens_computed - before == usage["input_tokens"] - held + usage["output_tokens"]
    restarted.close()


# -- LangGraph -------------------------------------------------------------------------------------------
def test_agent_with_sqlite_checkpointer_uses_one_session_per_thread(engine, tmp_path):
    sqlite3 = pytest.importorskip("sqlite3")
    from langchain.agents import create_agent
    from langgraph.checkpoint.sqlite import SqliteSaver

    connection = sqlite3.connect(tmp_path / "checkpoints.db", check_same_thread=False)
    agent = create_agent(
        ChatEMLLM(model=TINY_MODEL, max_tokens=6), tools=[add], checkpointer=SqliteSaver(connection)
    )
    config = thread("agent-thread")
    agent.invoke({"messages": [HumanMessage("What is 2 + 2?")]}, config)
    held = engine.session("agent-thread").stats().tokens
    state = agent.invoke({"messages": [HumanMessage("And 3 + 3?")]}, config)
    final = state["messages"][-1]
    assert isinstance(final, AIMessage)
    assert final.usage_metadata["input_token_details"]["cache_read"] >= held - 1
    assert len(state["messages"]) >= 4  # the checkpointer kept the first exchange
    connection.close()
