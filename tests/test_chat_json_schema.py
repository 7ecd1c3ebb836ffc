"""emllm.json_schema: the grammar accepts exactly canonical JSON under a schema, and the logits processor
keeps arbitrary logits on it without the token budget ever choosing a value: a document the budget cuts
short is left unfinished (and says so), never closed early with values the model did not write."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from emllm.chat import ToolSpec, tool_call_schema
from emllm.json_schema import (
    JsonSchemaLogitsProcessor,
    SchemaError,
    advance,
    compile_schema,
    initial_state,
    is_complete,
    shortest_completion,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field


class Joke(BaseModel):
    setup: str
    punchline: str


class Item(BaseModel):
    name: str = Field(max_length=8)
    count: int = Field(ge=1, le=12)
    tags: list[Literal["a", "b"]] = Field(default_factory=list, max_length=3)
    note: str | None = None


class Order(BaseModel):
    items: list[Item] = Field(min_length=1)
    urgent: bool
    price: float


def accepts(schema, text: str) -> bool:
    state = advance(initial_state(compile_schema(schema)), text)
    return bool(state) and is_complete(state)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"setup": "a", "punchline": "b"}', True),
        ('{"setup": "a \\"quoted\\" \\u00e9\\n", "punchline": ""}', True),
        ('{"setup": "a"}', False),  # missing a required property
        ('{"punchline": "b", "setup": "a"}', False),  # properties follow the schema's order
        ('{"setup":"a", "punchline": "b"}', False),  # canonical separators only
        ('{"setup": "a\nb", "punchline": "b"}', False),  # raw control character
        ('{"setup": "a", "punchline": "b", "extra": 1}', False),
    ],
)
def test_grammar_accepts_canonical_json_only(text, ok):
    assert accepts(Joke.model_json_schema(), text) is ok


def test_numbers_integers_and_bounds():
    bounded = {"type": "integer", "exclusiveMinimum": -1000, "exclusiveMaximum": 1000}
    assert accepts(bounded, "3") and accepts(bounded, "-999") and accepts(bounded, "0")
    assert not accepts(bounded, "1000") and not accepts(bounded, "03") and not accepts(bounded, "1.5")
    assert not advance(initial_state(compile_schema({"type": "integer", "minimum": 5})), "-")
    for text in ("-1.5", "0.25", "7", "-0.5"):
        assert accepts({"type": "number"}, text), text
    for text in ("1.", "1.e3", "1e3", "01", "-", "+1", "-0", "1.50", "0.00001"):
        assert not accepts({"type": "number"}, text), text


def test_unions_refs_enums_and_free_objects():
    schema = Order.model_json_schema()  # $defs/$ref, anyOf with null, enum items, bounds
    good = Order(items=[Item(name="x", count=2, tags=["a"])], urgent=True, price=1.5)
    assert accepts(schema, good.model_dump_json().replace('":', '": ').replace(',"', ', "'))
    assert accepts(True, '{"a": [1, "x", null, {"b": true}], "c": -2.5}')
    assert accepts({"type": ["string", "null"]}, "null")
    assert accepts({"enum": ["red", 3]}, "3") and not accepts({"enum": ["red", 3]}, '"blue"')


def test_shortest_completion_closes_every_open_structure():
    state = advance(initial_state(compile_schema(Joke.model_json_schema())), '{"setup": "ab')
    assert shortest_completion(state) == '", "punchline": ""}'
    state = initial_state(compile_schema({"type": "integer", "minimum": 10}), suffix="\n</x>")
    assert shortest_completion(state) == "10\n</x>"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"tag": {"enum": ["x"]}}},
        {"type": "strange"},
        {"$ref": "#/$defs/Missing"},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
        {"type": "integer", "minimum": 5, "maximum": 1},
        {"enum": []},
        "not a schema",
    ],
)
def test_invalid_schemas_raise_schema_error(schema):
    if schema == {"type": "object", "properties": {"tag": {"enum": ["x"]}}}:
        compile_schema(schema)  # valid: the control case
        return
    with pytest.raises(SchemaError):
        compile_schema(schema)


def _decode(tokenizer, schema, max_new_tokens: int, seed: int, eos: int):
    """Decode greedily from random logits under the processor (what a random-weight model does)."""
    processor = JsonSchemaLogitsProcessor(
        tokenizer, schema, max_new_tokens=max_new_tokens, eos_token_ids=[eos]
    )
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(processor(ids, torch.randn(len(tokenizer), generator=generator))))
        ids.append(token)
        if token == eos:
            break
    return tokenizer.decode(ids, skip_special_tokens=True), ids, processor


@pytest.mark.parametrize(("model", "budget"), [(Joke, 12), (Joke, 40), (Order, 40), (Order, 90)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_logits_give_a_valid_document_or_an_unfinished_one(smol_tokenizer, model, budget, seed):
    """Never a document closed early: either the logits ended it (valid, canonical), or the budget ran
    out and the text is an unfinished prefix of a valid document, which the processor reports."""
    eos = smol_tokenizer.eos_token_id
    text, ids, processor = _decode(smol_tokenizer, model.model_json_schema(), budget, seed, eos)
    if ids[-1] == eos:
        model.model_validate_json(text)
        assert json.dumps(json.loads(text), ensure_ascii=False) == text  # canonical: re-renders identically
        assert processor.is_complete_after(ids)
    else:
        assert len(ids) == budget and not processor.is_complete_after(ids)
        assert advance(initial_state(compile_schema(model.model_json_schema())), text)  # still on the grammar


def test_budget_too_small_for_any_valid_document(smol_tokenizer):
    from emllm.errors import EMLLMError
    from emllm.json_schema import TokenBudgetError

    with pytest.raises(TokenBudgetError, match="cannot hold the smallest") as caught:
        JsonSchemaLogitsProcessor(
            smol_tokenizer, Order.model_json_schema(), max_new_tokens=3, eos_token_ids=[2]
        )
    assert isinstance(caught.value, EMLLMError) and isinstance(caught.value, ValueError)


def test_end_of_sequence_only_once_complete(smol_tokenizer):
    processor = JsonSchemaLogitsProcessor(
        smol_tokenizer, {"type": "boolean"}, max_new_tokens=8, eos_token_ids=[2]
    )
    assert not processor.allowed_mask()[2]
    token = smol_tokenizer.encode("true", add_special_tokens=False)
    processor._catch_up(token)
    mask = processor.allowed_mask()
    assert mask[2] and mask.sum() == 1


# -- the budget never chooses a value (issue 19) --------------------------------------------------------
INTEGERS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
MULTIPLY = tool_call_schema([ToolSpec("multiply", "Multiply.", {**INTEGERS, "required": ["a", "b"]})])
CLOSER = "\n</tool_call>"  # the hermes closer, decoded after the call's JSON
CALL_67 = '{"name": "multiply", "arguments": {"a": 6, "b": 7}}'  # 27 tokens with CLOSER: the smallest
CALL_647 = '{"name": "multiply", "arguments": {"a": 64, "b": 7}}'  # 28 tokens with CLOSER
JOKE = '{"setup": "Why do cats purr?", "punchline": "Because they can."}'  # 21 tokens (smallest: 11)
WANTED = {
    "call_67": (MULTIPLY, CLOSER, CALL_67),
    "call_647": (MULTIPLY, CLOSER, CALL_647),
    "joke": (Joke.model_json_schema(), "", JOKE),
}


def _follow(tokenizer, name: str, budget: int):
    """Greedy decoding by a model that wants to write WANTED[name] (its own tokens), then stop."""
    schema, suffix, text = WANTED[name]
    eos = tokenizer.eos_token_id
    plan = [*tokenizer.encode(text + suffix, add_special_tokens=False), eos]
    processor = JsonSchemaLogitsProcessor(
        tokenizer, schema, max_new_tokens=budget, eos_token_ids=[eos], suffix=suffix
    )
    ids: list[int] = []
    while len(ids) < budget and (not ids or ids[-1] != eos):
        logits = torch.zeros(len(tokenizer))
        logits[plan[min(len(ids), len(plan) - 1)]] = 10.0
        ids.append(int(torch.argmax(processor(ids, logits))))
    return ids, plan[:-1], processor


@pytest.mark.parametrize(
    ("name", "budget"),
    [
        *[("call_67", n) for n in (27, 28, 30, 35, 40)],  # the issue: 30 gave {"a": 0, "b": 0}
        *[("call_647", n) for n in (27, 28, 40)],  # 27: too few for "64": left unfinished, not "6"
        *[("joke", n) for n in (11, 16, 20, 21, 30)],
    ],
)
def test_a_tight_budget_never_changes_what_the_model_writes(smol_tokenizer, name, budget):
    """Within the budget the model writes exactly what it wants; past it the document is cut, unfinished
    (a prefix of what it wanted), never closed early with other values."""
    ids, wanted, processor = _follow(smol_tokenizer, name, budget)
    written = [i for i in ids if i != smol_tokenizer.eos_token_id]
    if budget >= len(wanted):
        assert written == wanted
        assert processor.is_complete_after(ids)
    else:
        assert written == wanted[:budget]
        assert not processor.is_complete_after(ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(WANTED)), extra=st.integers(0, 8), step=st.integers(0, 99))
@example(name="call_67", extra=3, step=13)  # the issue: 30 tokens, and the digit 6 was forbidden
def test_no_budget_forbids_a_token_the_grammar_allows(smol_tokenizer, name, extra, step):
    """At any step of a valid document, under any budget that can hold it, its next token is allowed."""
    schema, suffix, text = WANTED[name]
    wanted = smol_tokenizer.encode(text + suffix, add_special_tokens=False)
    step %= len(wanted)
    processor = JsonSchemaLogitsProcessor(
        smol_tokenizer, schema, max_new_tokens=len(wanted) + extra, eos_token_ids=[2], suffix=suffix
    )
    logits = torch.zeros(len(smol_tokenizer))
    assert processor(wanted[:step], logits)[wanted[step]] == 0.0  # allowed: not masked to -inf


def test_number_prefixes_never_dead_end():
    """Every prefix the grammar accepts has a completion (the processor relies on it)."""
    for schema in (
        {"type": "number"},
        {"type": "integer"},
        {"type": "integer", "minimum": -5, "maximum": 40},
    ):
        start = initial_state(compile_schema(schema))
        frontier = [("", start)]
        for _ in range(4):
            frontier = [
                (text + c, nxt) for text, state in frontier for c in "-019." if (nxt := advance(state, c))
            ]
            for text, state in frontier:
                completion = shortest_completion(state)
                assert completion is not None and accepts(schema, text + completion), (schema, text)
