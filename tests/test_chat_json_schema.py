"""emllm.json_schema: the grammar accepts exactly canonical JSON under a schema, and the logits processor
turns arbitrary logits into valid documents within the token budget."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from emllm.json_schema import (
    JsonSchemaLogitsProcessor,
    SchemaError,
    advance,
    compile_schema,
    initial_state,
    is_complete,
    shortest_completion,
)
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


def _decode(tokenizer, schema, max_new_tokens: int, seed: int, eos: int) -> str:
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
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(("model", "budget"), [(Joke, 12), (Joke, 40), (Order, 40), (Order, 90)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_logits_always_give_a_valid_document_within_budget(smol_tokenizer, model, budget, seed):
    text = _decode(smol_tokenizer, model.model_json_schema(), budget, seed, smol_tokenizer.eos_token_id)
    model.model_validate_json(text)
    assert json.dumps(json.loads(text), ensure_ascii=False) == text  # canonical: re-renders identically


def test_budget_too_small_for_any_valid_document(smol_tokenizer):
    with pytest.raises(ValueError, match="cannot hold the smallest"):
        JsonSchemaLogitsProcessor(
            smol_tokenizer, Order.model_json_schema(), max_new_tokens=3, eos_token_ids=[2]
        )


def test_end_of_sequence_only_once_complete(smol_tokenizer):
    processor = JsonSchemaLogitsProcessor(
        smol_tokenizer, {"type": "boolean"}, max_new_tokens=8, eos_token_ids=[2]
    )
    assert not processor.allowed_mask(8)[2]
    token = smol_tokenizer.encode("true", add_special_tokens=False)
    processor._catch_up(token)
    mask = processor.allowed_mask(8 - len(token))
    assert mask[2] and mask.sum() == 1


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
