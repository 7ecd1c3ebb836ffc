"""Synthetic long-context tasks: the passkey retrieval prompt and planted facts in real text.

Used by the demo, the slow tests and the benchmarks, so all three ask the same question the same way.
The noise passkey is the standard raw-text template (Mohtashami & Jaggi); real-text haystacks go through
the model's chat template (SmolLM2-135M fails a raw-text Austen passkey even inside its window, and the
chat-rendered noise passkey at 4k). Knows nothing about memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n\n"
)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"


@dataclass(frozen=True)
class Probe:
    """One planted fact: feed `context`, then ask `question` (its own chunk); `answer` scores the output."""

    context: str
    question: str
    answer: str

    def is_correct(self, output: str) -> bool:
        return self.answer.lower() in output.lower()


def demo_text() -> str:
    """The ~20k-token public-domain novel excerpt shipped with the package."""
    return (
        resources.files("emllm").joinpath("data/pride_and_prejudice_excerpt.txt").read_text(encoding="utf-8")
    )


def fill_to_tokens(tokenizer, source: str, n_tokens: int, offset: int = 0) -> str:
    """A stretch of `source` (repeated if needed) about n_tokens long, starting near char offset."""
    if n_tokens <= 0:
        return ""
    chars_per_token = max(len(source[:20000]) / max(len(tokenizer.encode(source[:20000])), 1), 1.0)
    want = int(n_tokens * chars_per_token)
    repeated = source * (1 + (offset + want) // max(len(source), 1))
    piece = repeated[offset : offset + want]
    ids = tokenizer.encode(piece, add_special_tokens=False)
    if len(ids) > n_tokens:
        piece = tokenizer.decode(ids[:n_tokens])
    return piece


def _render_user_turn(tokenizer, content: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """(context, question) such that context + question is the chat-rendered prompt with an answer prefix."""
    marker = "\x00QUESTION\x00"
    messages = [{"role": "user", "content": content + marker}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = rendered.split(marker)
    return before, question + after + answer_prefix


def passkey_probe(
    tokenizer, context_tokens: int, depth: float, key: str, haystack: str = "noise", text: str | None = None
) -> Probe:
    """The standard passkey task at `depth` (0..1) of a ~context_tokens haystack ("noise" or real `text`)."""
    needle = PASSKEY_NEEDLE.format(key=key)
    body = context_tokens - len(tokenizer.encode(PASSKEY_INTRO + needle + PASSKEY_QUESTION)) - 40
    source = NOISE if haystack == "noise" else text
    if source is None:
        raise ValueError("a real-text haystack needs `text`")
    before = fill_to_tokens(tokenizer, source, int(body * depth))
    after = fill_to_tokens(tokenizer, source, body - int(body * depth), offset=len(before))
    if haystack == "noise":
        question = f"{PASSKEY_QUESTION} {PASSKEY_ANSWER_PREFIX}"
        return Probe(context=PASSKEY_INTRO + before + needle + after, question=question, answer=key)
    content = PASSKEY_INTRO + before + "\n" + needle + after
    context, question = _render_user_turn(tokenizer, content, PASSKEY_QUESTION, " " + PASSKEY_ANSWER_PREFIX)
    return Probe(context=context, question=question, answer=key)


def random_key(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def planted_fact_probe(tokenizer, text: str, depth: float = 0.4) -> Probe:
    """The demo's task: a secret code planted in a novel excerpt, asked about at the end.

    SmolLM2-135M answers it with full attention at 2k and 4k tokens of the same novel (checked), so a
    failure at 20k is memory's, not the model's reading.
    """
    fact = "\n\nThe secret code of the Longbourn library is 73914. Remember it. 73914 is the secret code.\n\n"
    at = text.find("\n\n", int(len(text) * depth))
    content = text[:at] + fact + text[at:]
    question = "\n\nWhat is the secret code of the Longbourn library?"
    context, question = _render_user_turn(tokenizer, content, question, " The secret code is")
    return Probe(context=context, question=question, answer="73914")


__all__ = [
    "NOISE",
    "PASSKEY_ANSWER_PREFIX",
    "Probe",
    "demo_text",
    "fill_to_tokens",
    "passkey_probe",
    "planted_fact_probe",
    "random_key",
]
