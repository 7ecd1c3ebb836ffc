"""Conversation memory: facts told early in a long chat, asked about after a process restart.

A generated conversation: the user tells the assistant five personal facts, then shares passages of
Pride and Prejudice turn after turn (scripted short replies) for `--tokens` tokens, then - in a new
process - asks about the facts. Methods, all SmolLM2-135M:

- emllm: LangChain `ChatEMLLM` on one thread with a session store. The first process sends the whole
  history (the model reads it once, as events); the second process reopens the store and sends history
  + question: only the question is computed (`tokens_computed` is recorded to show it). The engine's
  default question recall is on (the question's top events by the upper layers attended by every layer);
- emllm_paper: the same store and questions with question_recall=0 (every layer retrieves alone, as
  published);
- rag: vector-store memory as agents keep it, one document per exchange (user turn + reply) embedded
  with all-MiniLM-L6-v2 (LlamaIndex VectorStoreIndex); the most similar exchanges that fit 2048 tokens
  (EM-LLM's retrieved + local budget) are put back into the prompt as chat turns, in time order;
- truncated: full attention over the most recent turns that fit 2048 tokens.

Score: the expected word in the answer (string_match_all). `source_hit` (rag, truncated): whether the
text in the prompt held the fact at all.

    python benchmarks/conversation_memory.py                    # 50k tokens of conversation
    python benchmarks/conversation_memory.py --tokens 4000 --results-dir /tmp/conv   # a trial run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import add_output_arguments, machine, outputs, replace_section, set_threads  # noqa: E402
from ruler_tasks import string_match_all  # noqa: E402

NOVEL = ROOT / "benchmarks" / "data" / "austen_pride_and_prejudice.txt"
SECTION = "## Conversation memory across a restart"
MODEL = "SmolLM2-135M-Instruct (bundled GGUF, fp32)"
METHODS = ("emllm", "emllm_paper", "rag", "truncated")
BUDGET_TOKENS = 2048
EXCHANGE_TOKENS = 512  # an exchange (~310 tokens) stays one document
RAG_EXCHANGES = 8  # retrieved, then as many as fit BUDGET_TOKENS are kept (6 of the novel's)
THREAD = "conversation-benchmark"
PASSAGE_CHARS = 1200  # about 300 tokens of the novel per user turn

# (what the user says early on, the late question, the expected word)
FACTS = (
    ("By the way, my sister is called Aurelia.", "What is my sister called?", "Aurelia"),
    ("My dog's name is Biscuit, he is a beagle.", "What is my dog's name?", "Biscuit"),
    ("I always keep my passport in the green suitcase.", "Where do I keep my passport?", "suitcase"),
    ("My favourite composer is Telemann.", "Who is my favourite composer?", "Telemann"),
    (
        "The wifi password at my cottage is marmalade.",
        "What is the wifi password at my cottage?",
        "marmalade",
    ),
)
REPLIES = (
    "Noted.",
    "A lovely passage.",
    "Austen's irony is sharp here.",
    "Thank you for sharing it.",
    "I enjoyed that one.",
)
ASK = "Answer briefly from what I told you earlier. {question}"


def conversation(tokenizer, tokens: int) -> list[tuple[str, str]]:
    """(role, text) turns: the facts first (each acknowledged), then novel passages up to ~tokens."""
    turns: list[tuple[str, str]] = [("system", "You are a helpful assistant with a long memory.")]
    for fact, _, _ in FACTS:
        turns += [("user", fact), ("assistant", "I will remember that.")]
    novel = NOVEL.read_text(encoding="utf-8")
    total, offset, i = 0, 0, 0
    while total < tokens:
        passage = novel[offset : offset + PASSAGE_CHARS]
        offset = (offset + PASSAGE_CHARS) % (len(novel) - PASSAGE_CHARS)
        user = f"Here is the next passage of the novel I am reading:\n\n{passage}"
        turns += [("user", user), ("assistant", REPLIES[i % len(REPLIES)])]
        total += len(tokenizer.encode(user)) + 8
        i += 1
    return turns


# -- phases (each its own process: reading, then asking after a restart) ------------------------------
def _chat_model(store: str, **overrides):
    import emllm

    from emllm_integrations.langchain import ChatEMLLM

    config = emllm.EMLLMConfig.preset("smollm2-135m", **overrides)
    engine = emllm.EMLLM.from_pretrained(config=config, store=emllm.SessionStore(store))
    return ChatEMLLM(engine=engine, session_id=THREAD, max_tokens=24), engine


def _messages(turns):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [kinds[role](content=text) for role, text in turns]


def phase_read(args) -> dict:
    """The first process: the whole conversation so far, one call; the session is saved by the thread."""
    llm, engine = _chat_model(args.store)
    turns = conversation(engine.tokenizer, args.tokens)
    start = time.perf_counter()
    llm.invoke(_messages([*turns, ("user", "Thanks for listening. Just say OK.")]))
    stats = engine.session(THREAD).stats()
    return {
        "tokens": stats.tokens,
        "events": stats.events,
        "read_seconds": round(time.perf_counter() - start, 1),
    }


def phase_ask(args, **overrides) -> list[dict]:
    """The second process: history + each question; the history comes from the store, not recomputed."""
    from langchain_core.messages import HumanMessage

    llm, engine = _chat_model(args.store, **overrides)
    turns = conversation(engine.tokenizer, args.tokens)
    rows = []
    for _, question, expected in FACTS:
        session = engine.session(THREAD)
        computed = session.stats().tokens_computed
        start = time.perf_counter()
        reply = llm.invoke([*_messages(turns), HumanMessage(content=ASK.format(question=question))])
        rows.append(
            {
                "question": question,
                "expected": expected,
                "answer": reply.content,
                "tokens_computed": session.stats().tokens_computed - computed,
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    return rows


def phase_baseline(args, method: str) -> list[dict]:
    from baselines import ChunkRetriever, MiniLMEmbedding, answer
    from emllm.models import load_model

    model, tokenizer = load_model()
    turns = conversation(tokenizer, args.tokens)
    retriever = None
    if method == "rag":
        exchanges = {f"user: {user}\nassistant: {reply}": (user, reply) for user, reply in _exchanges(turns)}
        retriever = ChunkRetriever(
            list(exchanges), tokenizer, EXCHANGE_TOKENS, RAG_EXCHANGES, MiniLMEmbedding()
        )
    rows = []
    for _, question, expected in FACTS:
        ask = ASK.format(question=question)
        if retriever is not None:
            recalled = [exchanges[text] for text in retriever.chunks(question)]
            messages = _fit(
                [turns[0]], [t for u, r in recalled for t in (("user", u), ("assistant", r))], ask, tokenizer
            )
            held = "\n".join(text for _, text in messages)
        else:
            messages = _fit([turns[0]], turns[1:], ask, tokenizer)
            held = "\n".join(text for _, text in messages)
        prompt = tokenizer.apply_chat_template(
            [{"role": r, "content": t} for r, t in messages], tokenize=False, add_generation_prompt=True
        )
        start = time.perf_counter()
        text, prompt_tokens = answer(model, tokenizer, prompt, 24)
        rows.append(
            {
                "question": question,
                "expected": expected,
                "answer": text,
                "prompt_tokens": prompt_tokens,
                "source_hit": expected.lower() in held.lower(),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    return rows


def _exchanges(turns) -> list[tuple[str, str]]:
    """(user turn, reply) pairs of a conversation (its system turn left out)."""
    body = turns[1:]
    return [(body[i][1], body[i + 1][1]) for i in range(0, len(body) - 1, 2)]


def _fit(head, candidates, ask: str, tokenizer) -> list[tuple[str, str]]:
    """head + the latest (user, reply) pairs of candidates that fit BUDGET_TOKENS + the question."""
    kept: list[tuple[str, str]] = []
    used = len(tokenizer.encode(ask))
    for i in range(len(candidates) - 2, -1, -2):
        pair = candidates[i : i + 2]
        cost = sum(len(tokenizer.encode(text)) + 6 for _, text in pair)
        if used + cost > BUDGET_TOKENS:
            break
        kept[:0] = pair
        used += cost
    return [*head, *kept, ("user", ask)]


def _in_subprocess(args, phase: str) -> object:
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--tokens",
        str(args.tokens),
        "--store",
        args.store,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# -- results ------------------------------------------------------------------------------------------
def summarise(samples: dict, read: dict, command: str, threads: int | None) -> dict:
    rows = []
    for method in METHODS:
        if method not in samples:
            continue
        answers = samples[method]
        row = {
            "task": "conversation_recall",
            "method": method,
            "haystack": "austen_chat",
            "context_tokens": read["tokens"],
            "n": len(answers),
            "score": round(statistics.fmean(a["score"] for a in answers), 3),
            "seconds_per_question": round(statistics.fmean(a["seconds"] for a in answers), 1),
        }
        if method.startswith("emllm"):
            row["tokens_computed_per_question"] = round(
                statistics.fmean(a["tokens_computed"] for a in answers)
            )
        else:
            row["source_recall"] = round(statistics.fmean(float(a["source_hit"]) for a in answers), 3)
        rows.append(row)
    return {
        "benchmark": "conversation_memory",
        "model": MODEL,
        "machine": machine(threads),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "read": read,
        "rows": rows,
        "answers": samples,
    }


def write_doc(summary: dict, doc: Path) -> None:
    read = summary["read"]
    lines = [
        SECTION,
        "",
        f"`{summary['command']}` — {summary['machine']}, {summary['date']}. Model: {summary['model']}.",
        f"Five personal facts told at the start of a chat, then {read['tokens']:,} tokens of turns (novel",
        "passages, scripted replies), then a process restart, then one question per fact through LangChain.",
        "emllm = `ChatEMLLM` with a session store (first process: read the history in "
        f"{read['read_seconds']:,.0f} s,",
        f"{read['events']:,} events; second process: history + question, prefix reused; question recall,",
        "the default); emllm_paper = the same with question_recall=0 (each layer retrieves alone); rag = one",
        "all-MiniLM-L6-v2 vector per exchange (LlamaIndex VectorStoreIndex), the most similar exchanges",
        f"that fit {BUDGET_TOKENS} tokens put back as chat turns; truncated = the latest turns that fit",
        f"{BUDGET_TOKENS} tokens. Score: the expected word in the answer.",
        *([summary["note"]] if summary.get("note") else []),
        "",
        "| method | context | n | score | prompt held the fact | tokens computed / question | s / question |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        recall = f"{r['source_recall']:.2f}" if "source_recall" in r else "-"
        computed = f"{r['tokens_computed_per_question']:,}" if "tokens_computed_per_question" in r else "all"
        lines.append(
            f"| {r['method']} | {r['context_tokens']:,} | {r['n']} | {r['score']:.2f} | {recall} | "
            f"{computed} | {r['seconds_per_question']:.1f} |"
        )
    replace_section(doc, SECTION, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000, help="tokens of conversation after the facts")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--store", default=str(Path.home() / ".cache" / "emllm" / "bench-conversation"))
    parser.add_argument(
        "--note", help="a sentence printed under the table (e.g. what else loaded the machine)"
    )
    add_output_arguments(parser)
    parser.add_argument(
        "--phase", choices=["read", "ask", "ask_paper", "rag", "truncated"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    set_threads(args.threads)
    if args.phase:
        run = {
            "read": phase_read,
            "ask": phase_ask,
            "ask_paper": lambda args: phase_ask(args, question_recall=0),
        }.get(args.phase)
        result = run(args) if run else phase_baseline(args, args.phase)
        print("RESULT " + json.dumps(result), flush=True)
        return

    out, doc, _ = outputs(args.results_dir)
    samples: dict[str, list[dict]] = {}
    read = _in_subprocess(args, "read")
    print(f"[conversation] read {read['tokens']:,} tokens in {read['read_seconds']} s", flush=True)
    for method in args.methods:
        phase = {"emllm": "ask", "emllm_paper": "ask_paper"}.get(method, method)
        answers = _in_subprocess(args, phase)
        for a in answers:
            a["score"] = string_match_all(a["answer"], [a["expected"]])
            print(f"[conversation] {method:9s} {a['score']:.0f} {a['question']!r} -> {a['answer'][:60]!r}")
        samples[method] = answers
    command = "python benchmarks/conversation_memory.py" + (
        f" --tokens {args.tokens}" if args.tokens != 50_000 else ""
    )
    summary = summarise(samples, read, command, args.threads) | ({"note": args.note} if args.note else {})
    (out / "conversation_memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_doc(summary, doc)
    print(f"[conversation] wrote {out / 'conversation_memory.json'} and {doc}")


if __name__ == "__main__":
    main()
