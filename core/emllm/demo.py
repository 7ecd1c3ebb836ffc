"""`emllm demo`: read a ~20k-token novel excerpt with a planted fact, answer a question about it from
episodic memory, and show the events retrieved and the memory figures."""

from __future__ import annotations

import sys
import textwrap
import time

from .config import EMLLMConfig
from .engine import EMLLM
from .models import DEFAULT_MODEL
from .tasks import demo_text, planted_fact_probe


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MB"


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(model: str = DEFAULT_MODEL, config: EMLLMConfig | None = None, max_new_tokens: int = 24) -> bool:
    """Run the demo; returns whether the answer contained the planted fact."""
    _say(f"EM-LLM demo: episodic memory for {model}")
    _say("loading the model (the first run converts the bundled GGUF once, about half a minute) ...")
    start = time.perf_counter()
    engine = EMLLM.from_pretrained(model, config=config)
    cfg = engine.config
    _say(
        f"loaded in {time.perf_counter() - start:.1f} s; attention per query: {cfg.n_init} initial + "
        f"{cfg.n_mem} retrieved + {cfg.n_local} local tokens"
    )

    probe = planted_fact_probe(engine.tokenizer, demo_text())
    n_tokens = len(engine.encode(probe.context))
    _say(f"\nreading 'Pride and Prejudice' (excerpt, {n_tokens:,} tokens) with a planted fact:")
    _say('  "... The secret code of the Longbourn library is 73914. Remember it. ..."')
    session = engine.session("demo")
    start = time.perf_counter()
    session.feed(probe.context, source_id="pride_and_prejudice", progress=True)
    prefill_s = time.perf_counter() - start
    stats = session.stats()
    _say(
        f"read {stats.tokens:,} tokens in {prefill_s:.0f} s ({stats.tokens / prefill_s:.0f} tokens/s), "
        f"cut into {stats.events} events (mean {stats.mean_event_size:.0f} tokens) by surprise"
    )

    question = "What is the secret code of the Longbourn library?"
    _say(
        f"\nQ: {question}\nA: The secret code is",
    )
    start = time.perf_counter()
    answer = ""
    for piece in session.stream(probe.question, max_new_tokens=max_new_tokens, stop=["\n"]):
        answer += piece
        print(piece, end="", flush=True)
    _say(f"\n({time.perf_counter() - start:.1f} s)")

    _say("\nevents retrieved for the question (scored by every layer's keys):")
    for hit in session.retrieve(question, k=3):
        snippet = textwrap.shorten(" ".join(hit.text.split()), 110)
        mark = "  <- the planted fact" if probe.answer in hit.text else ""
        _say(
            f"  event {hit.event_id:4d}  tokens {hit.token_start:>6,}-{hit.token_end:<6,} "
            f"score {hit.score:5.2f}"
            f"  {snippet}{mark}"
        )

    stats = session.stats()
    full_kv = (
        stats.tokens * engine.num_layers * 2 * engine.num_kv_heads * engine.head_dim * engine.dtype.itemsize
    )
    _say("\nmemory:")
    _say(f"  device tier (window, init, cache): {_mb(stats.device_bytes)}")
    _say(f"  CPU tier ({stats.events} events, {cfg.offload_dtype}): {_mb(stats.cpu_bytes)}")
    _say(f"  a full-attention KV cache of the same text: {_mb(full_kv)}")
    correct = probe.is_correct(answer)
    _say(f"\nanswer {'contains' if correct else 'does NOT contain'} the planted fact ({probe.answer}).")
    return correct


if __name__ == "__main__":
    sys.exit(0 if run_demo() else 1)
