"""The real default model (SmolLM2-135M-Instruct) doing what users run it for. Marked slow; CI runs them.

Budget: under 10 minutes on 2 cores together (the model loads once per run, each haystack is read once).
"""

from __future__ import annotations

import random

import pytest
from emllm.tasks import demo_text, passkey_probe, random_key

pytestmark = pytest.mark.slow

DEPTHS = (0.1, 0.5, 0.9)


@pytest.fixture(scope="module")
def passkeys_16k(smollm2):
    """16k tokens of filler per depth, read with a ~2.1k window (64 init + 1024 retrieved + 1024 local)."""
    runs = {}
    for depth in DEPTHS:
        key = random_key(random.Random(int(depth * 100)))
        probe = passkey_probe(smollm2.tokenizer, 16384, depth, key)
        session = smollm2.session()
        session.feed(probe.context, progress=False)
        runs[depth] = (probe, session, session.generate(probe.question, max_new_tokens=8))
    return runs


@pytest.mark.parametrize("depth", DEPTHS)
def test_passkey_16k_with_a_2k_window(smollm2, passkeys_16k, depth):
    probe, session, answer = passkeys_16k[depth]
    stats = session.stats()
    assert stats.tokens > 15000 and stats.events > 50  # 16384 nominal, prompt margin included
    assert stats.max_local_distance < stats.memory_distance < smollm2.max_position_embeddings
    assert probe.is_correct(answer), f"depth {depth}: expected {probe.answer}, got {answer!r}"


def test_retrieve_brings_back_the_needle(passkeys_16k):
    probe, session, _ = passkeys_16k[0.5]
    hits = session.retrieve("What is the pass key?", k=3)
    assert any(probe.answer in hit.text for hit in hits), [hit.text for hit in hits]


def test_real_text_events_map_back_to_the_text(smollm2):
    """On a novel: device memory stays flat past the window (but for one fp32 representative per event
    and layer), and every event and retrieval hit points at its own text and source."""
    session = smollm2.session()
    text = demo_text()
    session.feed(text[:20000], source_id="first", progress=False)
    first = session.stats()
    session.feed(text[20000:60000], source_id="second", progress=False)
    second = session.stats()
    per_event = smollm2.num_layers * smollm2.num_kv_heads * smollm2.head_dim * 4
    assert smollm2.config.cache_events("cpu") == 0
    assert second.device_bytes - first.device_bytes == (second.events - first.events) * per_event
    assert second.cpu_bytes > 2 * first.cpu_bytes
    for event in session.events():
        assert event.text == session.text[event.char_start : event.char_end]
        assert event.source_id == ("first" if event.token_start < first.tokens else "second")
    hits = session.retrieve("Netherfield Park is let at last", k=5)
    assert len(hits) == 5 and all(h.text == session.text[h.char_start : h.char_end] for h in hits)


def test_saved_session_of_the_real_model_continues_exactly(smollm2, tmp_path):
    """Save and reopen with SmolLM2 itself (its fingerprint, bf16 events, a ~2k-token session with events)."""
    from emllm import EMLLM, SessionStore

    def engine_with_store():
        return EMLLM(
            smollm2.model, smollm2.tokenizer, smollm2.config, name=smollm2.name, store=SessionStore(tmp_path)
        )

    first = engine_with_store()
    session = first.session("book")
    session.feed(demo_text()[:9000], progress=False)
    session.save()
    twin = smollm2.session()
    twin.feed(session.token_ids)
    first.close()
    again = engine_with_store().session("book")
    assert again.token_ids == twin.token_ids and again.stats().events == twin.stats().events
    question = "\nWho is speaking in this passage?"
    assert again.generate(question, max_new_tokens=12) == twin.generate(question, max_new_tokens=12)
