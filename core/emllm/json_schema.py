"""JSON-schema constrained decoding: a character-level JSON grammar compiled from a schema, and a
logits processor that forbids every token that would leave it.

`JsonSchemaLogitsProcessor(tokenizer, schema, max_new_tokens=...)` plugs into
`Session.generate(logits_processor=...)`. Output is canonical JSON as `json.dumps` writes it
(separators ", " and ": ", properties in schema order), so a re-rendered tool call tokenizes back to
what was generated. The token budget never steers the output: a value is never cut short or filled in
to close the document in time (that would be a valid-looking document the model did not write). When
`max_new_tokens` runs out first the output is an unfinished prefix of a valid document, and callers
report it as such (`is_complete`, `JsonSchemaLogitsProcessor.is_complete_after`). A budget that cannot
hold even the smallest valid document is refused up front (`TokenBudgetError`).

Supported: type (and lists of types), properties / required / additionalProperties, items,
minItems / maxItems, minLength / maxLength, enum, const, anyOf / oneOf, allOf (merged), $ref into
$defs / definitions, and integer bounds. Not enforced: pattern, format, number (float) bounds.
Knows nothing about chat, models or sessions: it sees a tokenizer's vocabulary and logits.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import EMLLMError, TokenBudgetError

MAX_NUMBER_DIGITS = 15  # significant digits of a number: exact round trip, and no endless digit loops
_PLAIN_STRING_FORBIDDEN = {'"', "\\"} | {chr(i) for i in range(0x20)}
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = set("0123456789abcdefABCDEF")


class SchemaError(EMLLMError, ValueError):
    """A JSON schema that cannot be used for constrained decoding."""


# -- schema compilation -------------------------------------------------------------------------------
@dataclass(eq=False)
class Node:
    """One compiled schema node. Hashed by identity, so parser states that hold it stay cheap."""

    kind: str  # object | array | string | number | integer | boolean | null | literal | union | any
    properties: list[tuple[str, Node]] = field(default_factory=list)
    required: frozenset[str] = frozenset()
    additional: Node | None = None  # value schema of free keys (objects without declared properties)
    items: Node | None = None
    min_items: int = 0
    max_items: int | None = None
    min_length: int = 0
    max_length: int | None = None
    literals: list[str] = field(default_factory=list)  # JSON texts of enum / const values
    options: list[Node] = field(default_factory=list)  # union alternatives
    low: int | None = None  # integer bounds, inclusive
    high: int | None = None
    _shortest: str | None = None

    def __repr__(self) -> str:  # recursive schemas would make the dataclass repr loop
        return f"Node({self.kind})"


def compile_schema(schema: dict[str, Any] | bool) -> Node:
    """Compile a JSON schema (dict, or True for "any JSON value") into grammar nodes."""
    if schema is True or schema == {}:
        return _any_node()
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be an object (dict), got {type(schema).__name__}")
    return _Compiler(schema).node(schema)


_ANY: Node | None = None


def _any_node() -> Node:
    """Any JSON value: a union of every type (objects with free keys, arrays of anything)."""
    global _ANY
    if _ANY is None:
        any_node = Node("union")
        obj = Node("object")
        arr = Node("array")
        any_node.options = [
            Node("string"),
            Node("number"),
            Node("literal", literals=["true", "false"]),
            Node("literal", literals=["null"]),
            obj,
            arr,
        ]
        obj.additional, arr.items = any_node, any_node
        _ANY = any_node
    return _ANY


class _Compiler:
    def __init__(self, root: dict[str, Any]):
        self.root = root
        self.refs: dict[str, Node] = {}

    def node(self, schema: dict[str, Any] | bool) -> Node:
        if schema is True or schema == {}:
            return _any_node()
        if schema is False or not isinstance(schema, dict):
            raise SchemaError(f"unsupported schema: {schema!r}")
        if "$ref" in schema:
            return self._ref(schema["$ref"])
        if "allOf" in schema:
            return self.node(self._merge_all_of(schema))
        if "const" in schema:
            return Node("literal", literals=[_dump(schema["const"])])
        if "enum" in schema:
            if not schema["enum"]:
                raise SchemaError("enum must list at least one value")
            return Node("literal", literals=[_dump(v) for v in schema["enum"]])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                base = {k: v for k, v in schema.items() if k != key}
                return self._union([{**base, **option} for option in schema[key]])
        kind = schema.get("type")
        if isinstance(kind, list):
            return self._union([{**schema, "type": k} for k in kind])
        if kind is None:
            kind = _guess_type(schema)
        return self._typed(kind, schema)

    def _typed(self, kind: str, schema: dict[str, Any]) -> Node:
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            return Node(
                "array",
                items=self.node(schema.get("items", True)),
                min_items=int(schema.get("minItems", 0)),
                max_items=schema.get("maxItems"),
            )
        if kind == "string":
            return Node(
                "string", min_length=int(schema.get("minLength", 0)), max_length=schema.get("maxLength")
            )
        if kind == "integer":
            return _integer(schema)
        if kind == "number":
            return Node("number")
        if kind == "boolean":
            return Node("literal", literals=["true", "false"])
        if kind == "null":
            return Node("literal", literals=["null"])
        raise SchemaError(f"unknown JSON schema type {kind!r}")

    def _object(self, schema: dict[str, Any]) -> Node:
        properties = schema.get("properties") or {}
        if not isinstance(properties, dict):
            raise SchemaError("'properties' must be an object mapping names to schemas")
        required = schema.get("required") or []
        unknown = set(required) - set(properties)
        if properties and unknown:
            raise SchemaError(f"required properties not declared in 'properties': {sorted(unknown)}")
        node = Node("object", required=frozenset(required))
        node.properties = [(name, self.node(sub)) for name, sub in properties.items()]
        extra = schema.get("additionalProperties", not properties)
        if not properties and extra is not False:
            node.additional = self.node(True if extra is True else extra)
        return node

    def _union(self, options: list[dict[str, Any]]) -> Node:
        if not options:
            raise SchemaError("anyOf / oneOf must list at least one schema")
        nodes = [self.node(option) for option in options]
        return nodes[0] if len(nodes) == 1 else Node("union", options=nodes)

    def _ref(self, ref: str) -> Node:
        if ref in self.refs:
            return self.refs[ref]
        if not ref.startswith("#/"):
            raise SchemaError(f"only local $ref (#/...) is supported, got {ref!r}")
        target: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"$ref {ref!r} points nowhere in the schema")
            target = target[part]
        placeholder = Node("union")  # filled below; lets recursive schemas refer to themselves
        self.refs[ref] = placeholder
        resolved = self.node(target)
        placeholder.options = [resolved]
        return placeholder

    def _merge_all_of(self, schema: dict[str, Any]) -> dict[str, Any]:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self._deref(part)
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *value]
                else:
                    merged.setdefault(key, value)
        return merged

    def _deref(self, schema: dict[str, Any]) -> dict[str, Any]:
        while isinstance(schema, dict) and "$ref" in schema:
            target: Any = self.root
            for part in schema["$ref"][2:].split("/"):
                target = target[part]
            schema = target
        return schema


def _guess_type(schema: dict[str, Any]) -> str:
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    msg = f"schema has no 'type' (nor enum/const/anyOf/properties/items): {json.dumps(schema)[:200]}"
    raise SchemaError(msg)


def _integer(schema: dict[str, Any]) -> Node:
    low, high = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema:
        low = _floor_int(schema["exclusiveMinimum"]) + 1
    if "exclusiveMaximum" in schema:
        high = -_floor_int(-schema["exclusiveMaximum"]) - 1
    low = None if low is None else -_floor_int(-low)
    high = None if high is None else _floor_int(high)
    if low is not None and high is not None and low > high:
        raise SchemaError(f"integer bounds are empty: minimum {low} > maximum {high}")
    return Node("integer", low=low, high=high)


def _floor_int(value: float) -> int:
    return int(value // 1)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- parser states ------------------------------------------------------------------------------------
# A stack is a tuple of items, top last. An item is a tuple: ("lit", text, pos), ("val", node),
# ("str", node, count), ("esc", node, count, hex_left), ("num", node, text),
# ("obj", node, next_property, first), ("free", node, first), ("arr", node, count).
# A state is a frozenset of stacks (alternatives of anyOf, or keys sharing a prefix).
Stack = tuple
State = frozenset


def initial_state(node: Node, suffix: str = "") -> State:
    stack: Stack = (("lit", suffix, 0),) if suffix else ()
    return frozenset({(*stack, ("val", node))})


def advance(state: State, text: str) -> State:
    """The state after reading text; empty when text leaves the grammar."""
    for char in text:
        state = frozenset(s for stack in state for s in _step(stack, char))
        if not state:
            break
    return state


def is_complete(state: State) -> bool:
    return any(not stack for stack in _expand_all(state))


def shortest_completion(state: State) -> str | None:
    """The shortest text that completes the document from this state (None if the state is dead)."""
    best = None
    for stack in _expand_all(state):
        text = "".join(_item_shortest(item) for item in reversed(stack))
        if best is None or len(text) < len(best):
            best = text
    return best


def _expand_all(state: State) -> set[Stack]:
    return {s for stack in state for s in _expand(stack)}


def _expand(stack: Stack) -> list[Stack]:
    """Replace a top item that consumes no character by its alternatives, until each top reads one."""
    if not stack:
        return [stack]
    top, rest = stack[-1], stack[:-1]
    kind = top[0]
    if kind == "num" and _number_can_end(top[1], top[2]):
        return [stack, *_expand(rest)]  # a finished number may also be followed by what comes after it
    if kind in ("lit", "str", "esc", "num"):
        return [stack]
    out: list[Stack] = []
    if kind == "val":
        for pushed in _value_items(top[1]):
            out.extend(_expand(rest + pushed))
    elif kind == "obj":
        for pushed in _object_items(*top[1:]):
            out.extend(_expand(rest + pushed))
    elif kind == "free":
        node, first = top[1], top[2]
        out.extend(_expand((*rest, ("lit", "}", 0))))
        key = (("free", node, False), ("val", node.additional), ("lit", ": ", 0), ("str", _KEY, 0))
        out.extend(_expand((*rest, *key, ("lit", '"' if first else ', "', 0))))
    elif kind == "arr":
        node, count = top[1], top[2]
        if count >= node.min_items:
            out.extend(_expand((*rest, ("lit", "]", 0))))
        if node.max_items is None or count < node.max_items:
            element = (("arr", node, count + 1), ("val", node.items))
            sep = () if count == 0 else (("lit", ", ", 0),)
            out.extend(_expand(rest + element + sep))
    return out


_KEY = Node("string")


def _value_items(node: Node) -> list[Stack]:
    kind = node.kind
    if kind == "union":
        return [(("val", option),) for option in node.options]
    if kind == "literal":
        return [(("lit", text, 0),) for text in node.literals]
    if kind == "string":
        return [(("str", node, 0), ("lit", '"', 0))]
    if kind in ("number", "integer"):
        return [(("num", node, ""),)]
    if kind == "object":
        inner = ("free", node, True) if node.additional is not None else ("obj", node, 0, True)
        return [(inner, ("lit", "{", 0))]
    if kind == "array":
        return [(("arr", node, 0), ("lit", "[", 0))]
    raise SchemaError(f"cannot decode schema node {kind!r}")


def _object_items(node: Node, index: int, first: bool) -> list[Stack]:
    """After '{' or a property value: close, or any next declared property that skips no required one."""
    out: list[Stack] = []
    for j in range(index, len(node.properties)):
        name, value = node.properties[j]
        key = ("" if first else ", ") + _dump(name) + ": "
        out.append((("obj", node, j + 1, False), ("val", value), ("lit", key, 0)))
        if name in node.required:
            return out
    out.append((("lit", "}", 0),))
    return out


def _step(stack: Stack, char: str) -> list[Stack]:
    out: list[Stack] = []
    for s in _expand(stack):
        if not s:
            continue
        top, rest = s[-1], s[:-1]
        kind = top[0]
        if kind == "lit":
            text, pos = top[1], top[2]
            if text[pos] == char:
                out.append((*rest, ("lit", text, pos + 1)) if pos + 1 < len(text) else rest)
        elif kind == "str":
            out.extend(_string_step(top, rest, char))
        elif kind == "esc":
            out.extend(_escape_step(top, rest, char))
        elif kind == "num":
            grown = _number_grow(top[1], top[2], char)
            if grown is not None:
                out.append((*rest, ("num", top[1], grown)))
    return out


def _string_step(top: tuple, rest: Stack, char: str) -> list[Stack]:
    node, count = top[1], top[2]
    if char == '"':
        return [rest] if count >= node.min_length else []
    if node.max_length is not None and count >= node.max_length:
        return []
    if char == "\\":
        return [(*rest, ("esc", node, count, -1))]
    if char in _PLAIN_STRING_FORBIDDEN:
        return []
    return [(*rest, ("str", node, count + 1))]


def _escape_step(top: tuple, rest: Stack, char: str) -> list[Stack]:
    node, count, hex_left = top[1], top[2], top[3]
    if hex_left == -1:
        if char == "u":
            return [(*rest, ("esc", node, count, 4))]
        return [(*rest, ("str", node, count + 1))] if char in _ESCAPES else []
    if char not in _HEX:
        return []
    if hex_left == 1:
        return [(*rest, ("str", node, count + 1))]
    return [(*rest, ("esc", node, count, hex_left - 1))]


# -- numbers ------------------------------------------------------------------------------------------
def _number_grow(node: Node, text: str, char: str) -> str | None:
    """text + char if it is still the prefix of a number this node accepts, else None."""
    grown = text + char
    if not _number_prefix_ok(grown, integer=node.kind == "integer"):
        return None
    if node.kind == "integer" and (node.low is not None or node.high is not None):
        return grown if _int_feasible(node, grown) else None
    return grown


def _number_prefix_ok(text: str, integer: bool) -> bool:
    """A prefix of a number as json.dumps writes it: no exponent, at most 15 significant digits."""
    match = (_INTEGER_PREFIX if integer else _NUMBER_PREFIX).match(text)
    if match is None:
        return False
    whole, fraction = match.group("whole") or "", match.groupdict().get("fraction") or ""
    if whole == "0" and fraction.startswith("0000"):
        return False  # json.dumps writes magnitudes below 1e-4 with an exponent
    if integer and text == "-0":
        return False
    digits = len(whole) + len(fraction)
    return digits < MAX_NUMBER_DIGITS or (digits == MAX_NUMBER_DIGITS and not fraction.endswith("0"))


_INTEGER_PREFIX = re.compile(r"-?(?P<whole>0|[1-9]\d*)?\Z")
_NUMBER_PREFIX = re.compile(r"-?(?:(?P<whole>0|[1-9]\d*)(?:\.(?P<fraction>\d*))?)?\Z")


def _number_can_end(node: Node, text: str) -> bool:
    if not text or text in ("-", "-0") or text[-1] == "." or ("." in text and text[-1] == "0"):
        return False  # "-0" and "1.50" are not how json.dumps writes numbers
    if node.kind == "integer":
        value = int(text)
        return (node.low is None or value >= node.low) and (node.high is None or value <= node.high)
    return True


def _int_feasible(node: Node, text: str) -> bool:
    """Some completion of this integer prefix lies within the node's bounds."""
    return _int_completion(node, text) is not None


def _int_completion(node: Node, text: str) -> str | None:
    """The shortest digits to append to `text` so the integer lies within bounds (None: impossible)."""
    low = node.low if node.low is not None else -(10**MAX_NUMBER_DIGITS)
    high = node.high if node.high is not None else 10**MAX_NUMBER_DIGITS
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    if not digits:
        value = min(high, -1) if negative else max(low, 0)
        return str(abs(value)) if low <= value <= high else None
    if digits == "0":
        return "" if low <= 0 <= high and not negative else None
    value = int(digits)
    for extra in range(MAX_NUMBER_DIGITS - len(digits) + 1):
        scale = 10**extra
        lo_mag, hi_mag = value * scale, value * scale + scale - 1
        lo_val, hi_val = (-hi_mag, -lo_mag) if negative else (lo_mag, hi_mag)
        if lo_val <= high and hi_val >= low:
            target = max(lo_val, low) if not negative else min(hi_val, high)
            return str(abs(target))[len(digits) :]
    return None


def _number_shortest(node: Node, text: str) -> str:
    if _number_can_end(node, text):
        return ""
    if node.kind == "integer":
        return _int_completion(node, text) or ""
    if not text:
        return "0"
    if text == "-0":
        return ".1"
    return "1"  # after "-", after ".", or after a fraction's trailing zero


# -- shortest completions -----------------------------------------------------------------------------
def _item_shortest(item: tuple) -> str:
    kind = item[0]
    if kind == "lit":
        return item[1][item[2] :]
    if kind == "val":
        return _node_shortest(item[1])
    if kind == "str":
        node, count = item[1], item[2]
        return "a" * max(node.min_length - count, 0) + '"'
    if kind == "esc":
        node, count, hex_left = item[1], item[2], item[3]
        head = "n" if hex_left == -1 else "0" * hex_left
        return head + "a" * max(node.min_length - count - 1, 0) + '"'
    if kind == "num":
        return _number_shortest(item[1], item[2])
    if kind == "obj":
        node, index, first = item[1], item[2], item[3]
        parts = []
        for name, value in node.properties[index:]:
            if name in node.required:
                sep = "" if first and not parts else ", "
                parts.append(sep + _dump(name) + ": " + _node_shortest(value))
        return "".join(parts) + "}"
    if kind == "free":
        return "}"
    if kind == "arr":
        node, count = item[1], item[2]
        missing = max(node.min_items - count, 0)
        elements = [_node_shortest(node.items)] * missing
        return (", " if count and missing else "") + ", ".join(elements) + "]"
    raise AssertionError(kind)


def _node_shortest(node: Node) -> str:
    if node._shortest is None:
        node._shortest = "\0"  # recursion guard: a recursive option never wins
        best = None
        for stack in _expand((("val", node),)):
            text = "".join(_item_shortest(item) for item in reversed(stack))
            if "\0" not in text and (best is None or len(text) < len(best)):
                best = text
        node._shortest = best  # None again when only a recursive branch was seen: retried next time
    return node._shortest if node._shortest is not None else "\0"


# -- vocabulary -----------------------------------------------------------------------------------------
class VocabularyIndex:
    """Every ordinary token's text, sorted for prefix walks, plus a mask of "plain" string tokens.

    Built once per tokenizer (about a second for a 50k vocabulary) and cached.
    """

    _cache: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    def __init__(self, texts: Sequence[str], skip_ids: Iterable[int] = ()):
        skip = set(skip_ids)
        pairs = sorted((text, i) for i, text in enumerate(texts) if text and i not in skip)
        self.size = len(texts)
        self.texts = list(texts)
        self.sorted_texts = [t for t, _ in pairs]
        self.sorted_ids = [i for _, i in pairs]
        plain = torch.zeros(self.size, dtype=torch.bool)
        lengths = torch.zeros(self.size, dtype=torch.long)
        self.special: list[tuple[int, str]] = []  # tokens with quotes, backslashes or control characters
        for text, i in pairs:
            lengths[i] = len(text)
            if _PLAIN_STRING_FORBIDDEN.isdisjoint(text):
                plain[i] = True
            else:
                self.special.append((i, text))
        self.plain_string_mask = plain
        self.lengths = lengths

    @classmethod
    def for_tokenizer(cls, tokenizer) -> VocabularyIndex:
        try:
            return cls._cache[tokenizer]
        except (KeyError, TypeError):
            pass
        size = len(tokenizer)
        skip = set(getattr(tokenizer, "all_special_ids", []) or [])
        skip.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        index = cls(_token_texts(tokenizer, size), skip)
        with contextlib.suppress(TypeError):  # a tokenizer that cannot be weakly referenced: no cache
            cls._cache[tokenizer] = index
        return index


def _token_texts(tokenizer, size: int) -> list[str]:
    """Each token's text as it reads inside a sequence (a leading space survives)."""
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    probe = tokenizer.encode(" a", add_special_tokens=False)
    if len(probe) == 1 and texts[probe[0]] == "a":  # SentencePiece drops a lone token's leading space
        anchor = tokenizer.encode("a", add_special_tokens=False)[0]
        skip = len(tokenizer.decode([anchor]))
        texts = [t[skip:] for t in tokenizer.batch_decode([[anchor, i] for i in range(size)])]
    return texts


# -- the logits processor -----------------------------------------------------------------------------
class JsonSchemaLogitsProcessor:
    """Masks logits so that generation yields a JSON document valid under `schema`, then `suffix`.

    Use it with `Session.generate(..., logits_processor=processor, max_new_tokens=n)`, passing the same
    n as `max_new_tokens` here. End-of-sequence is allowed only once the document (and suffix) is
    complete. Only the grammar masks tokens, never the budget: if n tokens run out before the document
    is complete, the output is left unfinished (`is_complete_after` tells). Raises SchemaError for
    schemas it cannot compile and TokenBudgetError when n cannot hold even the smallest valid document
    (counted in tokens of this tokenizer).
    """

    def __init__(
        self,
        tokenizer,
        schema: dict[str, Any] | bool,
        *,
        max_new_tokens: int,
        eos_token_ids: Iterable[int],
        suffix: str = "",
    ):
        self.index = VocabularyIndex.for_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted(set(eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("constrained decoding needs at least one end-of-sequence token id")
        self.max_new_tokens = max_new_tokens
        self.state = initial_state(compile_schema(schema), suffix)
        self.text = ""
        self._consumed = 0
        self._masks: dict[State, torch.Tensor] = {}
        smallest = shortest_completion(self.state) or ""
        needed = self._tokens_to_write(smallest)[0]
        if needed > max_new_tokens:
            msg = (
                f"max_new_tokens={max_new_tokens} cannot hold the smallest output valid under this schema "
                f"({needed} tokens: {smallest[:80]!r})"
            )
            raise TokenBudgetError(msg)

    @property
    def complete(self) -> bool:
        """Whether the text read so far is a complete document (and suffix)."""
        return is_complete(self.state)

    def is_complete_after(self, generated_ids: Sequence[int]) -> bool:
        """Whether these generated ids (all of them, the last one included) spell a complete document."""
        self._catch_up(list(generated_ids))
        return self.complete

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._catch_up(generated_ids)
        allowed = self.allowed_mask()
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def _catch_up(self, generated_ids: list[int]) -> None:
        for token in generated_ids[self._consumed :]:
            if token not in self.eos_token_ids:
                text = self.index.texts[token] if token < self.index.size else ""
                self.state = advance(self.state, text)
                self.text += text
        self._consumed = len(generated_ids)

    def allowed_mask(self) -> torch.Tensor:
        """Boolean mask (V,) of the tokens allowed next: those that keep the text a prefix of a valid
        document, and end-of-sequence once it is complete.

        The budget left plays no part: forcing an early close would write values the model did not
        choose (a number cut to its first digit, a required property filled with a placeholder).
        """
        mask = torch.zeros(self.index.size, dtype=torch.bool)
        if not self.state or is_complete(self.state):  # dead (never steered into) or complete
            mask[self.eos_token_ids] = True
            if not self.state or not self._can_continue():
                return mask
        return mask | self._free_mask()

    def _can_continue(self) -> bool:
        return any(stack for stack in _expand_all(self.state))

    def _free_mask(self) -> torch.Tensor:
        cached = self._masks.get(self.state)
        if cached is None:
            cached = self._string_fast_path() if self._in_plain_string() else self._walk_mask()
            if len(self._masks) > 256:
                self._masks.clear()
            self._masks[self.state] = cached
        return cached

    def _in_plain_string(self) -> bool:
        stacks = _expand_all(self.state)
        return len(stacks) == 1 and bool(next(iter(stacks))) and next(iter(stacks))[-1][0] == "str"

    def _string_fast_path(self) -> torch.Tensor:
        (stack,) = _expand_all(self.state)
        node, count = stack[-1][1], stack[-1][2]
        mask = self.index.plain_string_mask.clone()
        if node.max_length is not None:
            mask &= self.index.lengths <= node.max_length - count
        for token, text in self.index.special:
            if advance(self.state, text):
                mask[token] = True
        return mask

    def _walk_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.index.size, dtype=torch.bool)
        texts, ids = self.index.sorted_texts, self.index.sorted_ids
        todo = [(0, 0, len(texts), self.state)]
        while todo:
            depth, lo, hi, state = todo.pop()
            while lo < hi and len(texts[lo]) == depth:
                if depth:
                    mask[ids[lo]] = True
                lo += 1
            while lo < hi:
                char = texts[lo][depth]
                end = bisect.bisect_left(texts, texts[lo][:depth] + chr(ord(char) + 1), lo, hi)
                nxt = advance(state, char)
                if nxt:
                    todo.append((depth + 1, lo, end, nxt))
                lo = end
        return mask

    def _prefix_tokens(self, text: str) -> list[tuple[int, int]]:
        """(token, length) of every token whose text is a non-empty prefix of `text`."""
        texts, ids = self.index.sorted_texts, self.index.sorted_ids
        found = []
        for n in range(1, len(text) + 1):
            prefix = text[:n]
            at = bisect.bisect_left(texts, prefix)
            while at < len(texts) and texts[at] == prefix:
                found.append((ids[at], n))
                at += 1
            if at < len(texts) and not texts[at].startswith(prefix):
                break  # no longer token starts with this prefix
        return found

    def _tokens_to_write(self, text: str) -> list[int]:
        """plan[i] = fewest tokens that spell text[i:] (len(text) + 1 entries; plan[-1] = 0)."""
        plan = [0] * (len(text) + 1)
        for i in range(len(text) - 1, -1, -1):
            lengths = [n for _, n in self._prefix_tokens(text[i:])]
            plan[i] = min((1 + plan[i + n] for n in lengths), default=len(text) + 1)
        return plan


__all__ = [
    "JsonSchemaLogitsProcessor",
    "Node",
    "SchemaError",
    "TokenBudgetError",
    "VocabularyIndex",
    "advance",
    "compile_schema",
    "initial_state",
    "is_complete",
    "shortest_completion",
]
