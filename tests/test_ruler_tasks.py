"""RULER task generators (benchmarks/ruler_tasks.py): lengths, needle placement, prompts and scoring.

Tokenizer-level only (SmolLM2's real tokenizer and chat template, no weights)."""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AUSTEN = ROOT / "benchmarks" / "data" / "austen_pride_and_prejudice.txt"


def _load_module():
    spec = importlib.util.spec_from_file_location("ruler_tasks", ROOT / "benchmarks" / "ruler_tasks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ruler_tasks"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


rt = _load_module()
CASES = [(task, haystack) for task, spec in rt.TASKS.items() for haystack in spec.haystacks]


@pytest.fixture(scope="module")
def austen() -> str:
    return AUSTEN.read_text()[:120_000]  # plenty for 4k-token haystacks, quicker to split


def _sample(tok, task, haystack, length, text, seed=7):
    return rt.make_sample(tok, task, haystack, length, seed=seed, text=text)


@pytest.mark.parametrize(("task", "haystack"), CASES)
@pytest.mark.parametrize("length", [2048, 4096])
def test_prompt_fills_the_length_minus_the_generation_budget(smol_tokenizer, austen, task, haystack, length):
    sample = _sample(smol_tokenizer, task, haystack, length, austen)
    budget = length - sample.max_new_tokens
    seen = len(smol_tokenizer.encode(sample.context)) + len(smol_tokenizer.encode(sample.question))
    assert seen == sample.prompt_tokens
    slack = 40 if haystack == "noise" else 160  # at most about one haystack unit (sentence) short
    assert budget - slack <= sample.prompt_tokens <= budget
    assert sample.max_new_tokens == rt.TOKENS_TO_GENERATE[rt.TASKS[task].kind]


@pytest.mark.parametrize(("task", "haystack"), [c for c in CASES if c[0] != "vt"])
def test_needles_sit_at_their_depths(smol_tokenizer, austen, task, haystack):
    """RULER's depth counts haystack sentences, not characters."""
    sample = _sample(smol_tokenizer, task, haystack, 4096, austen)
    body = sample.context.split("afterwards.\n", 1)[1]
    sentences = rt.split_sentences(body)
    needle = re.compile(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.")
    at = [i for i, s in enumerate(sentences) if needle.fullmatch(s)]
    spec = rt.TASKS[task]
    assert len(at) == spec.num_keys * spec.num_values
    assert all(d in rt.DEPTHS for d in sample.depths)
    haystack_sentences = len(sentences) - len(at)
    for k, (index, depth) in enumerate(zip(at, sample.depths, strict=True)):
        assert (index - k) / haystack_sentences == pytest.approx(depth, abs=0.01)


def test_niah_single_prompt_is_rulers_singular_template(smol_tokenizer, austen):
    sample = _sample(smol_tokenizer, "niah_single", "noise", 2048, austen)
    (value,) = sample.answers
    key = re.search(rf"magic numbers for ([a-z]+-[a-z]+) is: {value}\.", sample.context).group(1)
    assert "A special magic number is hidden within the following text." in sample.context
    assert "I will quiz you about the number afterwards.\n" in sample.context
    assert sample.context.count(rt.NOISE) > 50 and "\n" + rt.NOISE in sample.context
    assert sample.question.startswith(f"\nWhat is the special magic number for {key} mentioned")
    assert sample.question.endswith(f"The special magic number for {key} mentioned in the provided text is")
    assert "<|im_start|>assistant\n" in sample.question and sample.context.startswith("<|im_start|>")


def test_multikey_asks_one_of_four_keys_and_multivalue_wants_four_values(smol_tokenizer, austen):
    multikey = _sample(smol_tokenizer, "niah_multikey", "austen", 2048, austen)
    keys = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d{7})", multikey.context)
    assert len({k for k, _ in keys}) == 4
    asked = dict(keys)
    query_key = re.search(r"number for ([a-z]+-[a-z]+) mentioned", multikey.question).group(1)
    assert multikey.answers == (asked[query_key],)

    multivalue = _sample(smol_tokenizer, "niah_multivalue", "austen", 2048, austen)
    pairs = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d{7})", multivalue.context)
    assert len({k for k, _ in pairs}) == 1 and sorted(v for _, v in pairs) == sorted(multivalue.answers)
    assert "What are all the special magic numbers for" in multivalue.question
    assert multivalue.question.endswith("mentioned in the provided text are")


def test_variable_tracking_is_one_chain_of_four_hops_after_a_one_shot_example(smol_tokenizer, austen):
    sample = _sample(smol_tokenizer, "vt", "noise", 4096, austen)
    names = sample.answers
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(rf"VAR {names[0]} = (\d{{5}})", sample.context).group(1)
    hops = [sample.context.index(f"VAR {b} = VAR {a} ") for a, b in itertools.pairwise(names)]
    assert hops == sorted(hops) and sample.context.index(f"VAR {names[0]} = {value}") < hops[0]
    example, _ = sample.context.split("\n\nMemorize and track", 1)
    assert re.search(r"they are: +[A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}$", example)
    assert all(name not in example for name in names)
    assert f"Find all variables that are assigned the value {value} in the text above." in sample.question
    assert sample.question.endswith(f"5 variables are assgined the value {value}, they are:")


def test_samples_are_reproducible_from_their_seed(smol_tokenizer, austen):
    a = _sample(smol_tokenizer, "niah_multikey", "austen", 2048, austen, seed=3)
    b = _sample(smol_tokenizer, "niah_multikey", "austen", 2048, austen, seed=3)
    c = _sample(smol_tokenizer, "niah_multikey", "austen", 2048, austen, seed=4)
    assert a == b and a.answers != c.answers


def test_string_match_all_scores_the_share_of_references_found():
    assert rt.string_match_all("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert rt.string_match_all("123456", ["1234567"]) == 0.0
    assert rt.string_match_all("1111111, 3333333 and 4", ["1111111", "2222222", "3333333", "4"]) == 0.75
    assert rt.string_match_all("  they are: abcde FGHIJ\x00", ["ABCDE", "fghij"]) == 1.0
    assert rt.postprocess("\t 12\x0734 \n") == "12\n34"


def test_sample_score_uses_its_own_answers(smol_tokenizer, austen):
    sample = _sample(smol_tokenizer, "niah_multivalue", "austen", 2048, austen)
    assert sample.score(" ".join(sample.answers)) == 1.0
    assert sample.score(sample.answers[0]) == 0.25
    assert sample.score("I do not know.") == 0.0


def test_real_text_haystack_needs_text(smol_tokenizer):
    with pytest.raises(ValueError, match="needs the text"):
        rt.make_sample(smol_tokenizer, "niah_single", "austen", 2048, seed=0)
    assert rt.split_sentences('He said "Yes." Then she left!  Next one?') == [
        'He said "Yes."',
        "Then she left!",
        "Next one?",
    ]
