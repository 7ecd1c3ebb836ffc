"""emllm.chat: rendering with chat templates (with and without tool support) and tool-call parsing; and
forced tool calls under a token budget (ChatSession on tiny random models): cut short means an invalid
call, never one with made-up arguments."""

from __future__ import annotations

import copy
import json

import pytest
from emllm.chat import (
    DEFAULT_TOOL_PROMPT,
    ChatFormatError,
    ChatMessage,
    ToolCall,
    ToolSpec,
    detect_tool_format,
    format_tool_call,
    parse_tool_calls,
    render_chat,
    template_supports_tools,
)

WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city.",
    {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
)

# Our own minimal templates in the style of tool-aware models (Hermes/Qwen and Llama 3.1).
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}"
    '<|eot_id|>{% endfor %}{% if tools %}Use JSON {"name": ..., "parameters": ...}{% endif %}'
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture
def tool_tokenizer(smol_tokenizer):
    def with_template(template: str):
        tokenizer = copy.deepcopy(smol_tokenizer)
        tokenizer.chat_template = template
        return tokenizer

    return with_template


# -- rendering -------------------------------------------------------------------------------------------
def test_plain_chat_renders_exactly_as_the_template(smol_tokenizer):
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    expected = smol_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert render_chat(smol_tokenizer, messages) == expected
    assert render_chat(smol_tokenizer, [{"role": "user", "content": "Hi"}]).endswith(
        "<|im_start|>assistant\n"
    )


def test_template_without_tools_gets_the_default_tool_prompt(smol_tokenizer):
    assert not template_supports_tools(smol_tokenizer)
    assert detect_tool_format(smol_tokenizer) == "hermes"
    call = ToolCall("get_weather", {"location": "Paris"}, "call_1")
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", '{"temp": 21}', tool_call_id="call_1", name="get_weather"),
        ChatMessage("tool", "sunny", tool_call_id="call_1", name="get_weather"),
    ]
    text = render_chat(smol_tokenizer, messages, [WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert DEFAULT_TOOL_PROMPT.splitlines()[2] in text
    assert '"name": "get_weather"' in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}'
        in text
    )
    # both results in one user turn, JSON content kept as JSON
    assert text.count("<|im_start|>user") == 2
    assert '{"name": "get_weather", "content": {"temp": 21}}' in text
    assert '{"name": "get_weather", "content": "sunny"}' in text


def test_tool_aware_template_renders_tools_natively(tool_tokenizer):
    tokenizer = tool_tokenizer(HERMES_TEMPLATE)
    assert template_supports_tools(tokenizer) and detect_tool_format(tokenizer) == "hermes"
    call = ToolCall("get_weather", {"location": "Paris"}, "call_1")
    messages = [ChatMessage("user", "Weather?"), ChatMessage("assistant", "", tool_calls=(call,))]
    text = render_chat(tokenizer, messages, [WEATHER])
    assert text.startswith('<|im_start|>system\n<tools>{"type": "function"')
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>' in text
    assert "# Tools" not in text  # the default prompt is only for templates without tools
    assert detect_tool_format(tool_tokenizer(LLAMA3_TEMPLATE)) == "llama3"


def test_strict_templates_get_same_role_neighbours_merged(tool_tokenizer):
    strict = (
        "{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    )
    text = render_chat(tool_tokenizer(strict), [ChatMessage("user", "a"), ChatMessage("user", "b")])
    assert text == "[user]a\n\nb"


@pytest.mark.parametrize(
    ("messages", "tools", "match"),
    [
        ([], None, "empty conversation"),
        ([{"role": "wizard", "content": "x"}], None, "unknown message role"),
        ([{"content": "x"}], None, "needs a role"),
        ([{"role": "user", "content": "x"}], [{"name": "bad name!"}], "invalid tool name"),
        (
            [{"role": "user", "content": "x"}],
            [{"name": "t", "parameters": {"type": "array"}}],
            "type 'object'",
        ),
        ([{"role": "user", "content": "x"}], [WEATHER, WEATHER], "unique"),
        ([{"role": "user", "content": "x"}], [{"description": "no name"}], "without a name"),
    ],
)
def test_bad_input_raises_a_clear_error(smol_tokenizer, messages, tools, match):
    with pytest.raises(ChatFormatError, match=match):
        render_chat(smol_tokenizer, messages, tools)


def test_user_messages_cannot_carry_tool_calls():
    with pytest.raises(ChatFormatError, match="only assistant"):
        ChatMessage("user", "x", tool_calls=(ToolCall("t", {}),))


# -- parsing ---------------------------------------------------------------------------------------------
NAMES = ["get_weather", "add"]


def test_hermes_blocks_with_text_around():
    text = (
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
    )
    reply = parse_tool_calls(text, tool_names=NAMES)
    assert reply.content == "Let me check both."
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("get_weather", {"location": "Paris"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert all(c.id.startswith("call_") for c in reply.tool_calls)


def test_hermes_block_cut_by_max_tokens_is_still_read():
    reply = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Rome"}}')
    assert reply.tool_calls[0].arguments == {"location": "Rome"}


@pytest.mark.parametrize(
    "text",
    [
        '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Oslo"}}',  # Llama 3.1
        '{"name": "get_weather", "parameters": {"location": "Oslo"}}',
        '{"name": "get_weather", "arguments": {"location": "Oslo"}}',  # plain JSON
        '```json\n{"name": "get_weather", "arguments": {"location": "Oslo"}}\n```',
        '[{"name": "get_weather", "arguments": {"location": "Oslo"}}]',
    ],
)
def test_bare_json_calls(text):
    reply = parse_tool_calls(text, tool_names=NAMES)
    assert reply.content == ""
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"location": "Oslo"})]


def test_llama3_semicolon_separated_calls():
    text = '{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"a": 2}}'
    assert [c.arguments for c in parse_tool_calls(text, tool_names=NAMES).tool_calls] == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', "not valid JSON"),
        ('<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>', "unknown tool"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', "string 'name'"),
        ('<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>', "must be a JSON object"),
        ('<tool_call>\n{"name": "add", "arguments": "{oops"}\n</tool_call>', "not JSON"),
    ],
)
def test_bad_tool_json_becomes_an_invalid_call_not_a_crash(text, error):
    reply = parse_tool_calls(text, tool_names=NAMES)
    assert reply.tool_calls == []
    (invalid,) = reply.invalid_tool_calls
    assert error in invalid.error and invalid.arguments


def test_json_answers_and_plain_text_stay_content():
    answer = '{"name": "Alice", "age": 30}'
    assert parse_tool_calls(answer, tool_names=NAMES).content == answer  # not a known tool
    assert parse_tool_calls("{not json", tool_names=NAMES).content == "{not json"
    assert parse_tool_calls("Hello there.", tool_names=NAMES).content == "Hello there."


def test_format_tool_call_round_trips():
    call = ToolCall("get_weather", {"location": "Zürich"}, "c1")
    for fmt in ("hermes", "llama3", "json"):
        (parsed,) = parse_tool_calls(format_tool_call(call, fmt), tool_names=NAMES).tool_calls
        assert (parsed.name, parsed.arguments) == (call.name, call.arguments)
    assert json.loads(format_tool_call(call, "json"))["arguments"] == {"location": "Zürich"}


# -- forced calls under a token budget (issue 19) ----------------------------------------------------------
ADD = ToolSpec(
    "add",
    "Add two integers.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
QUESTION = [ChatMessage("user", "What is 2 + 3?")]


def _forced_reply(engine, budget: int, tool_format: str = "hermes"):
    from emllm.chat_session import ChatSession

    chat = ChatSession.of(engine.session(), tool_format=tool_format)
    return chat.reply(QUESTION, tools=[ADD], tool_choice="any", max_new_tokens=budget)


@pytest.mark.parametrize("tool_format", ["hermes", "llama3", "json"])
def test_a_forced_call_the_budget_cuts_short_is_an_invalid_call(make_smol_engine, tool_format):
    """Random weights write 15-digit numbers: 30 tokens cannot hold the call they are writing."""
    reply = _forced_reply(make_smol_engine(), 30, tool_format)
    assert reply.tool_calls == [] and reply.content == "" and reply.finish_reason == "length"
    (invalid,) = reply.invalid_tool_calls
    assert invalid.name == "add" and invalid.arguments.startswith('{"name": "add"')
    assert "token budget ran out (max_new_tokens=30)" in invalid.error


@pytest.mark.parametrize("budget", [28, 30, 32, 34, 36, 64])
def test_the_budget_never_changes_a_forced_calls_arguments(make_smol_engine, smol_tokenizer, budget):
    """With room for its own call the terse model writes it whole; with less, the call is invalid (or
    whole, when only the closing tag was cut); never a call with other arguments."""
    from conftest import tiny_smol_model

    engine = make_smol_engine(model=tiny_smol_model(smol_tokenizer, terse=True))
    own = _forced_reply(engine, 200)
    (call,) = own.tool_calls
    reply = _forced_reply(engine, budget)
    if reply.tool_calls or budget >= own.usage.output_tokens - 1:  # the call's tokens, end-of-turn aside
        assert [(c.name, c.arguments) for c in reply.tool_calls] == [(call.name, call.arguments)]
    else:
        assert reply.finish_reason == "length"
        assert "token budget ran out" in reply.invalid_tool_calls[0].error


def test_a_chat_stream_closed_from_another_thread_releases_the_chat(make_smol_engine):
    """A chat stream holds the chat across its yields; closing it on another thread (a web server's worker,
    the garbage collector) raised 'cannot release un-acquired lock' and left the chat locked for good."""
    import threading

    from emllm.chat_session import ChatSession

    chat = ChatSession.of(make_smol_engine().session())
    story = [{"role": "user", "content": "Tell me a story."}]
    stream = chat.stream(story, max_new_tokens=12, ignore_eos=True)
    next(stream)
    closer = threading.Thread(target=stream.close)
    closer.start()
    closer.join(timeout=30)
    replies: list = []
    worker = threading.Thread(
        target=lambda: replies.append(
            chat.reply([{"role": "user", "content": "Again."}], max_new_tokens=3, ignore_eos=True)
        ),
        daemon=True,  # a chat left locked must fail the test, not hang pytest
    )
    worker.start()
    worker.join(timeout=60)
    assert replies, "the chat stayed locked after its stream was closed on another thread"
