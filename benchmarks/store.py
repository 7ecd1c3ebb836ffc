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

No store (`--no-store`): the same model and text read into a session with no store, so every event
stays in RAM; the row compares how far RSS grows past the runtime (imports) with what `stats()` counts
(cpu_bytes + device_bytes) plus the model's weights. The session's own bookkeeping (token ids, surprise,
char spans, tensor headers) is what the difference holds; it should stay under half of what is counted.
Fields: tokens, chunk_size, runtime_rss_mb, final_rss_mb, counted_mb (stats + model), rss_over_counted
(final - runtime) / counted, within_1_5x, ingest_tok_s, events. These rows are kept beside the store rows
(results JSON key `no_store`, own table in the docs).

    python benchmarks/store.py --no-store --tokens 170000                    # about 1.5 min on 2 cores
    python benchmarks/store.py --no-store --tokens 170000 --chunk-size 16    # many appends; about 11 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
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


def _today() -> str:
    return datetime.date.today().isoformat()


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


def run_no_store_row(tokens: int, chunk_size: int | None) -> dict:
    """Ingest `tokens` tokens into a session without a store; RSS against what stats() counts."""
    import torch
    from emllm import EMLLM, EMLLMConfig

    runtime_mb = _rss_mb()  # python, torch and emllm imported, nothing built yet
    torch.set_num_threads(1)
    ids = list(AUSTEN.read_bytes())
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    model = _model()
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    config = EMLLMConfig() if chunk_size is None else EMLLMConfig(chunk_size=chunk_size)
    engine = EMLLM(model, ByteTokenizer(), config, name="store-bench")
    session = engine.session()
    start = time.perf_counter()
    for offset in range(0, tokens, PIECE_TOKENS):
        session.feed(ids[offset : offset + PIECE_TOKENS], progress=False)
        done = min(offset + PIECE_TOKENS, tokens)
        print(f"  {done:,} tokens, {time.perf_counter() - start:.0f} s, rss {_rss_mb():.0f} MB", flush=True)
    ingest_s = time.perf_counter() - start
    final_mb = _rss_mb()
    stats = session.stats()
    counted_mb = (stats.cpu_bytes + stats.device_bytes) / 2**20 + model_mb
    ratio = (final_mb - runtime_mb) / counted_mb
    return {
        "tokens": tokens,
        "chunk_size": config.chunk_size,
        "runtime_rss_mb": round(runtime_mb, 1),
        "final_rss_mb": round(final_mb, 1),
        "cpu_mb": round(stats.cpu_bytes / 2**20, 1),
        "device_mb": round(stats.device_bytes / 2**20, 1),
        "model_mb": round(model_mb, 1),
        "counted_mb": round(counted_mb, 1),
        "rss_over_counted": round(ratio, 2),
        "within_1_5x": ratio <= 1.5,
        "ingest_tok_s": round(tokens / ingest_s, 1),
        "events": stats.events,
    }


def _row_key(row: dict) -> tuple:
    return row.get("label"), row["tokens"], row["chunk_size"]


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
    no_store = summary.get("no_store")
    if no_store:
        lines += [
            "",
            "Without a store (`--no-store`): every event stays in RAM. Runtime = RSS with python, torch and "
            "emllm imported; counted = `stats().cpu_bytes + device_bytes` + the model's weights; the ratio "
            "is (final RSS - runtime) / counted. Rows labelled 'before' ran this script against the "
            "engine of the commit named (PYTHONPATH=<that checkout>/core).  ",
            f"Machine: {no_store['machine']}.  ",
            *(f"`{r['command']}` ({r['date']})  " for r in no_store["rows"]),
            "",
            "| code | tokens | chunk | events | runtime MB | final RSS MB | counted MB | ratio | within 1.5x "
            "| ingest tok/s |",
            "|:--|---:|---:|---:|---:|---:|---:|---:|:-:|---:|",
        ]
        for r in no_store["rows"]:
            lines.append(
                f"| {r.get('label', '')} | {r['tokens']:,} | {r['chunk_size']} | {r['events']:,} "
                f"| {r['runtime_rss_mb']:,.0f} | {r['final_rss_mb']:,.0f} | {r['counted_mb']:,.1f} "
                f"| {r['rss_over_counted']:.2f} | {'yes' if r['within_1_5x'] else 'NO'} "
                f"| {r['ingest_tok_s']:,.0f} |"
            )
    replace_section(DOC, "## Session store (`benchmarks/store.py`)", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--budget-mb", type=float, default=1024)
    parser.add_argument(
        "--no-store", action="store_true", help="sessions without a store: RSS against stats() (own table)"
    )
    parser.add_argument("--chunk-size", type=int, help="with --no-store: EMLLMConfig.chunk_size")
    parser.add_argument(
        "--label",
        default="current",
        help="with --no-store: names the code measured; rows of other labels, sizes or chunks are kept",
    )
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # internal: one row, JSON out
    args = parser.parse_args()
    if args.row:
        if args.no_store:
            row = run_no_store_row(args.tokens[0], args.chunk_size)
        else:
            row = run_row(args.tokens[0], args.budget_mb)
        print("ROW " + json.dumps(row), flush=True)
        return
    rows = []
    for tokens in args.tokens:
        print(f"{tokens:,} tokens, " + ("no store" if args.no_store else f"budget {args.budget_mb:,.0f} MB"))
        row_args = ["--tokens", str(tokens), "--budget-mb", str(args.budget_mb)]
        if args.no_store:
            row_args += ["--no-store"] + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
        proc = subprocess.run(
            [sys.executable, __file__, "--row", *row_args], stdout=subprocess.PIPE, text=True, check=True
        )
        for line in proc.stdout.splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
            else:
                print(line, flush=True)
        if args.no_store:
            command = "python benchmarks/store.py " + shlex.join(sys.argv[1:])
            rows[-1] = {"label": args.label, **rows[-1], "command": command, "date": _today()}
        print(json.dumps(rows[-1]), flush=True)
    run = {
        "machine": machine(threads=1),
        "date": _today(),
        "command": "python benchmarks/store.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    summary = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.no_store:  # the store rows, and other no-store rows (label, tokens, chunk), stay as they are
        measured = {_row_key(r) for r in rows}
        kept = [r for r in summary.get("no_store", {}).get("rows", []) if _row_key(r) not in measured]
        summary.setdefault("benchmark", "store")
        summary["no_store"] = {"machine": run["machine"], "rows": kept + rows}
    else:
        summary = {
            "benchmark": "store",
            **run,
            **({"no_store": summary["no_store"]} if "no_store" in summary else {}),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    if "rows" in summary:
        write_doc(summary)


if __name__ == "__main__":
    main()
