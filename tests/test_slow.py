"""The real default model (SmolLM2-135M-Instruct) doing what users run it for. Marked slow; CI runs them.

Budget: under 10 minutes on 2 cores together (the model loads once per run).
"""

from __future__ import annotations

import random

import pytest
from emllm.tasks import demo_text, passkey_probe, planted_fact_probe, random_key

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_16k_with_a_2k_window(smollm2, depth):
    """16k tokens of filler, a window of ~2.1k (64 init + 1024 retrieved + 1024 local): the key comes back."""
    key = random_key(random.Random(int(depth * 100)))
    probe = passkey_probe(smollm2.tokenizer, 16384, depth, key)
    session = smollm2.session()
    session.feed(probe.context, progress=False)
    answer = session.generate(probe.question, max_new_tokens=8)
    stats = session.stats()
    assert stats.tokens > 16000 and stats.events > 50
    assert stats.max_local_distance < stats.memory_distance < smollm2.max_position_embeddings
    assert probe.is_correct(answer), f"depth {depth}: expected {key}, got {answer!r}"


def test_planted_fact_in_a_novel_is_answered_and_retrieved(smollm2):
    """The demo's task: a fact in 20k tokens of Pride and Prejudice, asked at the end."""
    probe = planted_fact_probe(smollm2.tokenizer, demo_text())
    session = smollm2.session()
    session.feed(probe.context, source_id="pride_and_prejudice", progress=False)
    answer = session.generate(probe.question, max_new_tokens=12, stop=["\n"])
    assert probe.is_correct(answer), answer
    hits = session.retrieve("What is the secret code of the Longbourn library?", k=5)
    assert all(h.source_id == "pride_and_prejudice" for h in hits)
    assert all(h.text == session.text[h.char_start : h.char_end] for h in hits)


def test_device_memory_stays_flat_as_the_text_grows(smollm2):
    """Past the window, the device tier stops growing, but for one fp32 representative per event and layer."""
    session = smollm2.session()
    text = demo_text()
    session.feed(text[:20000], progress=False)
    first = session.stats()
    session.feed(text[20000:60000], progress=False)
    second = session.stats()
    per_event = smollm2.num_layers * smollm2.num_kv_heads * smollm2.head_dim * 4
    assert smollm2.config.cache_events("cpu") == 0
    assert second.device_bytes - first.device_bytes == (second.events - first.events) * per_event
    assert second.cpu_bytes > 2 * first.cpu_bytes
