"""RULER synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654): sample generators and scoring, pure.

Re-implemented from the task definitions of NVIDIA RULER (`scripts/data/synthetic/niah.py`,
`variable_tracking.py`, `constants.py`; read through the port in lm-evaluation-harness
`lm_eval/tasks/ruler/`): the same needle sentence, templates, answer prefixes, key/value kinds, 40-point
depth grid, needle counts (multikey: 4 keys, multivalue: 4 values, variable tracking: 1 chain of 4 hops
with a one-shot example) and `string_match_all` scoring. Two deliberate differences: the `essay`
haystack is Jane Austen instead of Paul Graham's essays (offline, public domain), and the prompt goes
through the model's chat template with the answer prefix opening the assistant turn (SmolLM2-135M fails
raw-text prompts). Knows nothing about models or memory; only a tokenizer, to fit lengths.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_HEAD = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
NIAH_QUERY = "\nWhat are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUERY = "\nQuestion: Find all variables that are assigned the value {query} in the text above."
# "assgined" is RULER's own spelling; kept so prompts match the published ones token for token.
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assgined the value {query}, they are: "
)
DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))  # RULER: np.linspace(0, 100, 40), rounded
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30}  # RULER's per-task generation budgets
VT_FEWSHOT_TOKENS = 500  # RULER builds its one-shot example at max_seq_length 500

# Keys are "adjective-noun" words, as RULER draws them from wonderwords' lists (not installed here).
_ADJECTIVE_TEXT = (
    "abandoned able acidic agreeable ancient angry anxious aromatic bashful bitter blue brave breezy "
    "bright broad calm careful cheerful chilly clever cloudy cold cooperative crooked curious damp "
    "dashing delicate eager elegant empty fancy fierce flaky fluffy fragile friendly gentle giant "
    "glossy graceful grumpy hollow humble hungry icy jolly juicy kind lazy little lively lonely loud "
    "lucky misty modern narrow nervous noisy odd old orange plain polite proud purple quiet quick "
    "rapid rare rough round rusty scary shaggy shiny silent silly slimy smooth solid sour spotty "
    "steady sticky stormy sturdy sweet tame tender tidy tiny tough upbeat vast warm wary wide wild"
)
_NOUN_TEXT = (
    "account actor airport anchor apple arch badge balloon basket beach bicycle blanket boat bottle "
    "bracelet bridge bucket button cabinet camera candle canyon carpet castle cellar chair cherry "
    "chimney circle clock cloud compass cottage crayon crown curtain desert diamond dinosaur dolphin "
    "drum eagle engine falcon feather fence fiddle forest fountain garden giraffe glacier guitar "
    "hammer harbor helmet island jacket kettle kitten ladder lantern lemon lighthouse magnet meadow "
    "mirror monkey needle notebook ocean orchard oyster paddle parrot pebble pencil pillow planet "
    "pocket puzzle rabbit radio ribbon river rocket saddle sandal scarf shovel statue tablet teapot "
    "tiger tractor trumpet tunnel umbrella violin wagon walrus window zebra"
)
_ADJECTIVES, _NOUNS = _ADJECTIVE_TEXT.split(), _NOUN_TEXT.split()

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'_)]))\s+")
_CONTROL = re.compile(r"[\x00-\x1f]")


@dataclass(frozen=True)
class TaskSpec:
    """One RULER task: how many keys and values its needles carry, and its default haystacks."""

    kind: str  # "niah" or "vt"
    num_keys: int = 1
    num_values: int = 1
    haystacks: tuple[str, ...] = ("noise",)


TASKS: dict[str, TaskSpec] = {
    # niah_single_1 (repeated noise) and niah_single_2 (essay -> Austen)
    "niah_single": TaskSpec("niah", haystacks=("noise", "austen")),
    "niah_multikey": TaskSpec("niah", num_keys=4, haystacks=("austen",)),  # niah_multikey_1
    "niah_multivalue": TaskSpec("niah", num_values=4, haystacks=("austen",)),
    "vt": TaskSpec("vt", haystacks=("noise",)),  # 1 chain, 4 hops
}


@dataclass(frozen=True)
class RulerSample:
    """One prompt, split where the engine reads it: feed `context`, then generate after `question`.

    `question` holds the query, the end of the user turn and the answer prefix; `answers` are scored by
    string_match_all. `depths` are the relative positions (0..1) of the inserted needles in the haystack.
    """

    task: str
    haystack: str
    context: str
    question: str
    answers: tuple[str, ...]
    depths: tuple[float, ...]
    prompt_tokens: int
    max_new_tokens: int

    def score(self, output: str) -> float:
        return string_match_all(output, self.answers)


def postprocess(prediction: str) -> str:
    """RULER's cleaning of a prediction: control characters become newlines, outer whitespace goes."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER's metric for one sample: the share of references found (case-insensitive) in the output."""
    pred = postprocess(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences (RULER joins its essays on whitespace, then sentence-splits)."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENTENCE_END.split(flat) if s]


def make_sample(
    tokenizer, task: str, haystack: str, context_tokens: int, seed: int, text: str | None = None
) -> RulerSample:
    """A RULER sample whose rendered prompt plus its generation budget fits in context_tokens."""
    spec = TASKS[task]
    rng = random.Random(seed)
    budget = context_tokens - TOKENS_TO_GENERATE[spec.kind]
    if haystack == "noise":
        units, joiner = [NOISE], ("\n" if spec.kind == "niah" else " ")
    elif text is None:
        raise ValueError(f"haystack {haystack!r} needs the text to draw sentences from")
    else:
        units, joiner = split_sentences(text), " "
    if spec.kind == "vt":
        if haystack == "noise":
            units = [NOISE + "\n"]  # RULER's variable-tracking noise line ends with a newline
        return _vt_sample(tokenizer, rng, units, joiner, budget, haystack)
    return _niah_sample(tokenizer, rng, spec, units, joiner, budget, task, haystack)


# -- needle in a haystack -----------------------------------------------------------------------------
def _niah_sample(tokenizer, rng, spec, units, joiner, budget, task, haystack) -> RulerSample:
    keys = _distinct(rng, spec.num_keys, lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}")
    values = _distinct(rng, spec.num_keys * spec.num_values, lambda: str(rng.randint(10**6, 10**7 - 1)))
    needles = [
        NEEDLE.format(kind="numbers", key=key, value=values[i * spec.num_values + j])
        for i, key in enumerate(keys)
        for j in range(spec.num_values)
    ]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    asked = rng.randrange(spec.num_keys)
    answers = tuple(values[asked * spec.num_values : (asked + 1) * spec.num_values])
    kind = "numbers"
    head, query, prefix = NIAH_HEAD, NIAH_QUERY, NIAH_ANSWER_PREFIX
    if len(answers) == 1:  # RULER's singular wording for one expected value
        kind = "number"
        head = head.replace("Some", "A").replace("are", "is")
        query = query.replace("are all", "is")
        prefix = prefix.replace("are", "is")
    query_key = keys[asked]

    def render(n: int) -> tuple[str, str]:
        body = _insert(_take(units, n), needles, depths, joiner)
        user_head = head.format(kind=kind) + body
        return _chat(
            tokenizer,
            user_head,
            query.format(kind=kind, query=query_key),
            prefix.format(kind=kind, query=query_key),
        )

    context, question, tokens = _fit(tokenizer, render, units, joiner, budget)
    return RulerSample(
        task, haystack, context, question, answers, tuple(depths), tokens, TOKENS_TO_GENERATE["niah"]
    )


# -- variable tracking --------------------------------------------------------------------------------
def _chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str]]:
    """(variable names, statements): VAR A = 12345, then VAR B = VAR A, ... hops times."""
    names = _distinct(rng, hops + 1, lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)))
    statements = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    statements += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, statements


def _vt_text(units, n, statements, depths, joiner) -> str:
    return _insert(_take(units, n), statements, depths, joiner).replace(". \n", ".\n")


def _vt_prompt(body: str, names: list[str], statements: list[str]) -> tuple[str, str, str]:
    value = statements[0].split("=")[-1].strip()
    query = VT_QUERY.format(query=value)
    prefix = VT_ANSWER_PREFIX.format(num_v=len(names), query=value)
    return VT_HEAD + body, query, prefix


def _vt_fewshot(tokenizer, rng, units, joiner) -> str:
    """RULER's one-shot example: a short chain (3-letter names) with its answer written out."""
    names, statements = _chain(rng, hops=4, letters=3)
    depths = sorted(rng.sample(DEPTHS, len(statements)))

    def raw(n: int) -> str:
        head, query, prefix = _vt_prompt(_vt_text(units, n, statements, depths, joiner), names, statements)
        return head + query + prefix + " ".join(names) + "\n\n"

    budget = VT_FEWSHOT_TOKENS - TOKENS_TO_GENERATE["vt"]
    n = max((k for k in range(1, 60) if len(tokenizer.encode(raw(k))) <= budget), default=1)
    return raw(n)


def _vt_sample(tokenizer, rng, units, joiner, budget, haystack) -> RulerSample:
    example = _vt_fewshot(tokenizer, rng, units, joiner)
    names, statements = _chain(rng, hops=4, letters=5)
    depths = sorted(rng.sample(DEPTHS, len(statements)))

    def render(n: int) -> tuple[str, str]:
        head, query, prefix = _vt_prompt(_vt_text(units, n, statements, depths, joiner), names, statements)
        return _chat(tokenizer, example + head, query, prefix)

    context, question, tokens = _fit(tokenizer, render, units, joiner, budget)
    return RulerSample(
        "vt", haystack, context, question, tuple(names), tuple(depths), tokens, TOKENS_TO_GENERATE["vt"]
    )


# -- shared helpers -----------------------------------------------------------------------------------
def _distinct(rng: random.Random, n: int, draw: Callable[[], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        item = draw()
        if item not in out:
            out.append(item)
    return out


def _take(units: list[str], n: int) -> list[str]:
    """The first n haystack units, cycling through the source when it is too short."""
    return [units[i % len(units)] for i in range(n)]


def _insert(units: list[str], needles: list[str], depths: list[float], joiner: str) -> str:
    """Needle i goes before unit int(len(units) * depths[i]) (depths sorted), as RULER places them."""
    parts = list(units)
    for offset, (needle, depth) in enumerate(zip(needles, depths, strict=True)):
        parts.insert(int(len(units) * depth) + offset, needle)
    return joiner.join(parts)


def _chat(tokenizer, user_head: str, query: str, answer_prefix: str) -> tuple[str, str]:
    """(context, question): the chat-rendered prompt split just before the query, answer prefix at the end.

    The answer prefix opens the assistant turn without RULER's leading space (the turn starts a line).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return user_head, query + " " + answer_prefix.strip()
    marker = "\x00QUERY\x00"
    messages = [{"role": "user", "content": user_head + marker}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = rendered.split(marker)
    return before, query + after + answer_prefix.strip()


def _count(tokenizer, context: str, question: str) -> int:
    """Tokens the engine sees: context and question are encoded separately, as they are fed."""
    return len(tokenizer.encode(context, add_special_tokens=False)) + len(
        tokenizer.encode(question, add_special_tokens=False)
    )


def _fit(tokenizer, render, units: list[str], joiner: str, budget: int) -> tuple[str, str, int]:
    """The longest haystack (in whole units) whose rendered prompt has at most `budget` tokens.

    Per-unit token counts predict the length; each measurement corrects the prediction, so a few
    full tokenisations suffice even at 128k (RULER searches in steps of 25 or 500 units instead).
    """
    base = _count(tokenizer, *render(0))
    if base > budget:
        raise ValueError(f"the prompt alone has {base} tokens, over the budget of {budget}")
    cumulative = _cumulative_unit_tokens(tokenizer, units, joiner, budget - base)
    correction, n, best = 0, 0, (0, render(0), base)
    for _ in range(8):
        fits = [k for k, c in enumerate(cumulative) if base + c + correction <= budget]
        n = fits[-1] if fits else 0
        context, question = render(n)
        tokens = _count(tokenizer, context, question)
        if tokens <= budget and n >= best[0]:
            best = (n, (context, question), tokens)
        correction = tokens - base - cumulative[n]
        if tokens <= budget and (n + 1 >= len(cumulative) or base + cumulative[n + 1] + correction > budget):
            break
    n, (context, question), tokens = best
    return context, question, tokens


def _cumulative_unit_tokens(tokenizer, units: list[str], joiner: str, need: int) -> list[int]:
    """cumulative[k] = predicted tokens of k units (with joiners), far enough to exceed `need`."""
    cumulative, i, batch = [0], 0, 256
    while cumulative[-1] <= need + 2000:
        piece = [joiner + units[(i + j) % len(units)] for j in range(batch)]
        for ids in tokenizer(piece, add_special_tokens=False).input_ids:
            cumulative.append(cumulative[-1] + len(ids))
        i += batch
        batch = min(4 * batch, 8192)
    return cumulative


def depth_of(haystack_text: str, needle: str) -> float:
    """Relative character position of `needle` in a haystack (for tests and sample logs)."""
    at = haystack_text.find(needle)
    return math.nan if at < 0 else at / max(len(haystack_text), 1)


__all__ = [
    "DEPTHS",
    "NEEDLE",
    "NOISE",
    "TASKS",
    "TOKENS_TO_GENERATE",
    "RulerSample",
    "TaskSpec",
    "make_sample",
    "postprocess",
    "split_sentences",
    "string_match_all",
]
