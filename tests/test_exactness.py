"""Exactness: while nothing is evicted, episodic attention is full attention, so a session reproduces the
model's own (sdpa) logits and greedy generations for every supported architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, EOS, reference_copy, tiny_model

ATOL = 1e-4
NO_EVICTION = dict(n_init=4, n_local=128, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16)


@pytest.fixture(params=list(ARCHITECTURES))
def pair(request, make_engine):
    """(engine factory, sdpa reference) over the same random weights of one architecture."""
    model = tiny_model(request.param, seed=3)
    # reference_copy shares model.config with its source, and the attention implementation lives on the
    # config: copy the model first so that the engine ("emllm") and the reference ("sdpa") stay apart.
    reference = reference_copy(copy.deepcopy(model))

    def build(**fields):
        return make_engine(model=model, **{**NO_EVICTION, **fields})

    return build, reference


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([ids])).logits[0].float()  # (T, V)


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs()
    assert diff.max() <= ATOL, f"{what}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("chunk_size", [16, 128])
def test_prefill_matches_reference(pair, chunk_size) -> None:
    build, reference = pair
    ids = random_ids(100)
    session = build(chunk_size=chunk_size).session("s")
    got = session.forward(ids)
    assert session.timeline.events == [] and session.timeline.init_len == 0
    assert_logits_close(got, reference_logits(reference, ids), f"prefill, chunk_size={chunk_size}")


def test_split_forwards_match_one_forward(pair) -> None:
    """Feeding in uneven pieces (chunks straddling calls) gives the logits of one full forward."""
    build, reference = pair
    ids = random_ids(100, seed=1)
    session = build().session("s")
    pieces = [ids[:7], ids[7:40], ids[40:41], ids[41:]]
    got = torch.cat([session.forward(piece) for piece in pieces])
    assert_logits_close(got, reference_logits(reference, ids), "pieces")


def test_decode_steps_match_reference(pair) -> None:
    build, reference = pair
    ids = random_ids(60, seed=2)
    session = build().session("s")
    session.forward(ids[:50])
    for i in range(50, 60):
        got = session.forward([ids[i]])  # one-token chunk
        want = reference_logits(reference, ids[: i + 1])[-1:]
        assert_logits_close(got, want, f"decode step {i - 49}")


def test_greedy_generation_matches_hf_generate(pair) -> None:
    build, reference = pair
    prompt = random_ids(40, seed=4)
    session = build().session("s")
    text = session.generate(prompt, max_new_tokens=8)
    generated = session.token_ids[len(prompt) :]
    inputs = torch.tensor([prompt])
    with torch.inference_mode():  # an explicit mask: HF would otherwise mask the prompt's pad id (0) out
        hf = reference.generate(
            inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=8, do_sample=False
        )
    assert generated == hf[0, len(prompt) :].tolist()
    assert len(generated) == 8 or generated[-1] == EOS
    assert session.stats().pending_tokens == 1  # the last generated token waits for the next call
    assert isinstance(text, str)


def test_forward_after_generate_continues_exactly(pair) -> None:
    """The pending last generated token is computed by the next call, at the right position."""
    build, reference = pair
    prompt, more = random_ids(30, seed=5), random_ids(12, seed=6)
    session = build().session("s")
    session.generate(prompt, max_new_tokens=5)
    so_far = session.token_ids
    got = session.forward(more)
    assert session.token_ids == so_far + more
    assert_logits_close(got, reference_logits(reference, so_far + more)[-len(more) :], "after generate")


def test_truncate_in_window_then_forward_matches_reference(pair) -> None:
    build, reference = pair
    ids, branch = random_ids(80, seed=7), random_ids(20, seed=8)
    session = build().session("s")
    session.feed(ids)
    session.truncate(50)
    got = session.forward(branch)
    assert session.token_ids == ids[:50] + branch
    assert_logits_close(got, reference_logits(reference, ids[:50] + branch)[50:], "after truncate")


# memory_positions="ordered" with a budget that holds every event: init + all events (in time order, at
# their true distances) + window is the whole history, so episodic attention is full attention again.
ALL_RECALLED = dict(
    n_init=4,
    n_local=64,
    n_mem=512,
    chunk_size=16,
    min_event_size=4,
    max_event_size=16,
    memory_positions="ordered",
    offload_dtype="float32",
)


def test_ordered_memory_holding_every_event_is_full_attention(pair) -> None:
    build, reference = pair
    ids = random_ids(200, seed=9)
    session = build(**ALL_RECALLED).session("s")
    got = session.forward(ids[:190])
    assert len(session.timeline.events) >= 8, "the test must evict: most of the history sits in events"
    assert_logits_close(got, reference_logits(reference, ids[:190]), "ordered prefill over events")
    for i in range(190, 200):
        step = session.forward([ids[i]])
        assert_logits_close(step, reference_logits(reference, ids[: i + 1])[-1:], f"ordered decode {i}")


def test_fixed_memory_holding_every_event_is_not_full_attention(pair) -> None:
    """The control: the paper's scheme puts every memory key at one distance, so the same budget and text
    give different logits (what the ordered test above proves is the positions, not the budget)."""
    build, reference = pair
    ids = random_ids(190, seed=9)
    session = build(**{**ALL_RECALLED, "memory_positions": "fixed"}).session("s")
    diff = (session.forward(ids) - reference_logits(reference, ids)).abs().max()
    assert diff > 10 * ATOL, f"fixed positions gave full attention's logits (max diff {diff:.3g})"
