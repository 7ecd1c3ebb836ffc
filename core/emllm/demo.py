"""`emllm demo`: read a ~20k-token novel excerpt with a planted fact, answer a question about it from
episodic memory three ways (each layer's own retrieval, as in the paper; with the question's recalled
events attended by every layer, the engine's default; those events also quoted as text), and show the
events retrieved and the memory figures."""

from __future__ import annotations

import sys
import textwrap
import time

from .config import EMLLMConfig
from .engine import EMLLM
from .models import DEFAULT_MODEL
from .tasks import demo_text, planted_fact_probe

RECALLED_EVENTS = 8  # events retrieved for the question, quoted with their neighbours


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
    hits = session.retrieve(question, k=RECALLED_EVENTS)
    _say(f"\nevents retrieved for the question (top 3 of {len(hits)}, scored by the upper layers' keys):")
    for hit in hits[:3]:
        snippet = textwrap.shorten(" ".join(hit.text.split()), 110)
        mark = "  <- the planted fact" if probe.answer in hit.text else ""
        _say(
            f"  event {hit.event_id:4d}  tokens {hit.token_start:>6,}-{hit.token_end:<6,} "
            f"score {hit.score:5.2f}"
            f"  {snippet}{mark}"
        )

    read = len(session.token_ids)
    _say(f"\nQ: {question}")
    answers = {}
    for label, how, options in (
        ("paper's retrieval", "each layer's own retrieval, as in the paper", {"question_recall": 0}),
        ("question recall", "the question's events attended by every layer, the default", {}),
    ):
        answers[label] = _answer(session, probe.question, max_new_tokens, how, **options)
        session.truncate(read)  # the same memory for every answer
    recalled = [hit.event_id for hit in hits]
    prompt = session.quote(recalled) + probe.question
    how = "those events attended and quoted"
    answer = answers["events attended and quoted"] = _answer(
        session, prompt, max_new_tokens, how, recall=recalled
    )

    stats = session.stats()
    full_kv = (
        stats.tokens * engine.num_layers * 2 * engine.num_kv_heads * engine.head_dim * engine.dtype.itemsize
    )
    _say("\nmemory:")
    _say(f"  device tier (window, init, cache): {_mb(stats.device_bytes)}")
    _say(f"  CPU tier ({stats.events} events, {cfg.offload_dtype}): {_mb(stats.cpu_bytes)}")
    _say(f"  a full-attention KV cache of the same text: {_mb(full_kv)}")
    for label, text in answers.items():
        verdict = "contains" if probe.is_correct(text) else "does NOT contain"
        _say(f"answer with {label}: {verdict} the planted fact ({probe.answer})")
    return probe.is_correct(answer)


def _answer(session, prompt: str, max_new_tokens: int, how: str, **options) -> str:
    """Stream one answer to `prompt` (its text ends with the answer's opening words)."""
    _say(f"A ({how}): The secret code is")
    start = time.perf_counter()
    answer = ""
    for piece in session.stream(prompt, max_new_tokens=max_new_tokens, stop=["\n"], **options):
        answer += piece
        print(piece, end="", flush=True)
    _say(f"\n({time.perf_counter() - start:.1f} s)")
    return answer


if __name__ == "__main__":
    sys.exit(0 if run_demo() else 1)
