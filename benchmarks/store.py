"""Session store at scale: ingest up to 1M tokens under a RAM budget, then reopen and retrieve.

The model is a small random byte-level decoder (4 layers, 4 KV heads of 32: 2 KB of bf16 keys and values
per token, 2 GB at 1M tokens), so a 1 GiB budget really forces the disk tier; the real SmolLM2 (23 KB
per token) would need 23 GB of disk and hours of prefill on 2 cores. Text: the Austen novel as bytes,
repeated. Each row runs in its own subprocess (peak RSS is per row).

Row fields: tokens, peak_rss_mb (whole process), baseline_rss_mb (after the first 16k tokens: model,
runtime and working buffers), budget_mb, peak_rss_within_budget (peak <= (baseline + budget) x 1.2),
disk_bytes_per_token, save_s_per_1k (time in saves, spills included, per 1k tokens), open_s (reopen in
a fresh engine, model load excluded), retrieval_ms_ram / retrieval_ms_disk (Session.retrieve with the
events held in RAM vs memory-mapped from disk).

    python benchmarks/store.py                       # 100k and 1M tokens, 1 GiB budget
    python benchmarks/store.py --tokens 50000 --budget-mb 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import machine, replace_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "store.json"
DOC = ROOT / "docs" / "benchmarks.md"
AUSTEN = ROOT / "benchmarks" / "data" / "austen_pride_and_prejudice.txt"
PIECE_TOKENS = 16384
QUERIES = ("Who is Mr. Darcy?", "What did Elizabeth say about the letter?", "Where is Pemberley?")


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ByteTokenizer:
    """One token per UTF-8 byte (with offsets): the benchmark's text needs no vocabulary file."""

    eos_token_id = 257
    eos_token = "<eos>"

    class _Encoding:
        def __init__(self, ids, offsets):
            self.input_ids, self.offset_mapping = ids, offsets

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        ids, offsets = [], []
        for i, char in enumerate(text):
            for byte in char.encode("utf-8"):
                ids.append(byte)
                offsets.append((i, i + 1))
        return self._Encoding(ids, offsets)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _model():
    """4 layers, 4 KV heads of 32: 2 KB of bf16 keys and values per token (2 GB at 1M tokens)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=260,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        eos_token_id=257,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _time_retrieval(session) -> float:
    session.retrieve(QUERIES[0], k=5)  # first touch (maps, checks checksums) is not the steady state
    times = []
    for query in QUERIES * 2:
        start = time.perf_counter()
        session.retrieve(query, k=5)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run_row(tokens: int, budget_mb: float) -> dict:
    """Ingest `tokens` tokens into a stored session under the budget, then measure; in this process."""
    import torch
    from emllm import EMLLM, EMLLMConfig, SessionStore

    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    tokenizer = ByteTokenizer()
    ids = list(AUSTEN.read_bytes())
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    model = _model()
    config = EMLLMConfig()
    folder = Path(tempfile.mkdtemp(prefix="emllm-store-bench-"))
    save_seconds = 0.0

    class TimedStore(SessionStore):
        def save(self, session) -> None:
            nonlocal save_seconds
            start = time.perf_counter()
            super().save(session)
            save_seconds += time.perf_counter() - start

    try:
        budget = int(budget_mb * 2**20)
        engine = EMLLM(
            model, tokenizer, config, name="store-bench", store=TimedStore(folder, max_ram_bytes=budget)
        )
        session = engine.session("book")
        baseline_mb = None
        start = time.perf_counter()
        for offset in range(0, tokens, PIECE_TOKENS):
            session.feed(ids[offset : offset + PIECE_TOKENS], progress=False)
            if baseline_mb is None:  # the working set of a running engine, before memory could grow much
                baseline_mb = _rss_mb()
            done = min(offset + PIECE_TOKENS, tokens)
            print(
                f"  {done:,} tokens, {time.perf_counter() - start:.0f} s, rss {_rss_mb():.0f} MB", flush=True
            )
        session.save()
        ingest_s = time.perf_counter() - start
        peak_mb = _peak_rss_mb()
        disk_bytes = engine.store.total_bytes()
        engine.close()
        engine.store.close()

        reopened = EMLLM(model, tokenizer, config, name="store-bench", store=SessionStore(folder))
        reopened._fingerprint = engine.fingerprint
        start = time.perf_counter()
        session = reopened.session("book")
        open_s = time.perf_counter() - start
        retrieval_disk = _time_retrieval(session)
        for layer in session.layers:  # the same events, copied into RAM
            for events in (layer.events_k, layer.events_v):
                events._load_into_ram(0)
        retrieval_ram = _time_retrieval(session)
        limit = (baseline_mb + budget_mb) * 1.2
        return {
            "tokens": tokens,
            "peak_rss_mb": round(peak_mb, 1),
            "baseline_rss_mb": round(baseline_mb, 1),
            "budget_mb": budget_mb,
            "peak_rss_within_budget": peak_mb <= limit,
            "disk_bytes_per_token": round(disk_bytes / tokens, 1),
            "save_s_per_1k": round(save_seconds / tokens * 1000, 4),
            "ingest_tok_s": round(tokens / ingest_s, 1),
            "open_s": round(open_s, 3),
            "retrieval_ms_ram": round(retrieval_ram, 2),
            "retrieval_ms_disk": round(retrieval_disk, 2),
            "events": session.stats().events,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_doc(summary: dict) -> None:
    lines = [
        "## Session store (`benchmarks/store.py`)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}; date {summary['date']}.  ",
        "Model: a random 4-layer byte-level decoder (4 KV heads x 32, bf16 offload: 2 KB of keys and "
        "values per token), so the disk tier is exercised at 1M tokens. Peak RSS is the whole process; "
        "baseline = RSS after the first 16k tokens; 'within' means peak <= (baseline + budget) x 1.2.",
        "",
        "| tokens | events | peak RSS MB | baseline MB | budget MB | within | disk B/token | save s/1k "
        "| ingest tok/s | open s | retrieve ms (RAM) | retrieve ms (disk) |",
        "|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['tokens']:,} | {r['events']:,} | {r['peak_rss_mb']:,.0f} | {r['baseline_rss_mb']:,.0f} "
            f"| {r['budget_mb']:,.0f} | {'yes' if r['peak_rss_within_budget'] else 'NO'} "
            f"| {r['disk_bytes_per_token']:,.0f} | {r['save_s_per_1k']:.3f} | {r['ingest_tok_s']:,.0f} "
            f"| {r['open_s']:.2f} | {r['retrieval_ms_ram']:.1f} | {r['retrieval_ms_disk']:.1f} |"
        )
    replace_section(DOC, "## Session store (`benchmarks/store.py`)", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--budget-mb", type=float, default=1024)
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # internal: one row, JSON out
    args = parser.parse_args()
    if args.row:
        print("ROW " + json.dumps(run_row(args.tokens[0], args.budget_mb)), flush=True)
        return
    rows = []
    for tokens in args.tokens:
        print(f"{tokens:,} tokens, budget {args.budget_mb:,.0f} MB", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--row", "--tokens", str(tokens), "--budget-mb", str(args.budget_mb)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
            else:
                print(line, flush=True)
        print(json.dumps(rows[-1]), flush=True)
    summary = {
        "benchmark": "store",
        "machine": machine(threads=1),
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/store.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    write_doc(summary)


if __name__ == "__main__":
    main()
