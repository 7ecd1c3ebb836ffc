"""Passkey retrieval: EM-LLM vs fixed-size blocks (the InfLLM baseline) vs full attention, SmolLM2-135M.

Each sample runs in its own subprocess (so peak RSS is per sample) and is appended to a JSONL log at
once, so an interrupted run resumes where it stopped. Aggregates go to benchmarks/results/passkey.json
and a table in docs/benchmarks.md.

    python benchmarks/passkey.py                                  # the default grid
    python benchmarks/passkey.py --lengths 4096 16384 --methods emllm full --haystacks noise
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import machine, replace_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SAMPLES = RESULTS / "passkey.samples.jsonl"
SUMMARY = RESULTS / "passkey.json"
DOC = ROOT / "docs" / "benchmarks.md"
AUSTEN = ROOT / "benchmarks" / "data" / "austen_pride_and_prejudice.txt"
DEPTHS = (0.1, 0.5, 0.9)
DECODE_TOKENS = 32
FULL_ATTENTION_MAX = 16384  # full attention is sampled up to here (all depths) ...
FULL_ATTENTION_SPEED_ONLY = 32768  # ... and once here, for its throughput


def run_sample(method: str, length: int, haystack: str, depth: float, key: str) -> dict:
    """One passkey sample in this process: feed, answer, then decode DECODE_TOKENS more for speed."""
    from emllm import EMLLM, EMLLMConfig
    from emllm.models import load_model
    from emllm.tasks import passkey_probe

    model, tokenizer = load_model()
    text = AUSTEN.read_text() if haystack == "austen" else None
    probe = passkey_probe(tokenizer, length, depth, key, haystack=haystack, text=text)
    if method == "full":
        return _run_full(model, tokenizer, probe) | {"memory_device_mb": None}
    preset = EMLLMConfig.preset("smollm2-135m", question_recall=0)  # as published: measured before it existed
    config = preset if method == "emllm" else preset.model_copy(update={"segmentation": "fixed"})
    session = EMLLM(model, tokenizer, config, name="smollm2-135m-instruct").session()
    start = time.perf_counter()
    session.feed(probe.context, progress=False)
    prefill_s = time.perf_counter() - start
    answer = session.generate(probe.question, max_new_tokens=8)
    start = time.perf_counter()
    session.generate(max_new_tokens=DECODE_TOKENS, ignore_eos=True)
    decode_s = time.perf_counter() - start
    stats = session.stats()
    return {
        "answer": answer,
        "context_tokens_actual": stats.tokens,
        "prefill_tok_s": stats.tokens / prefill_s if prefill_s else None,
        "decode_tok_s": DECODE_TOKENS / decode_s,
        "events": stats.events,
        "memory_device_mb": stats.device_bytes / 2**20,
        "correct": probe.is_correct(answer),
    }


def _run_full(model, tokenizer, probe) -> dict:
    """Full attention (sdpa) with transformers' own KV cache: the baseline."""
    import torch

    model.set_attn_implementation("sdpa")
    context = tokenizer(probe.context, return_tensors="pt", add_special_tokens=False).input_ids
    question = tokenizer(probe.question, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(context, use_cache=True)
        prefill_s = time.perf_counter() - start
        cache = out.past_key_values
        ids = question
        answer_ids: list[int] = []
        for step in range(8 + DECODE_TOKENS):
            if step == 8:
                start = time.perf_counter()
            out = model(ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            if step < 8:
                answer_ids.append(token)
            ids = torch.tensor([[token]])
        decode_s = time.perf_counter() - start
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    return {
        "answer": answer,
        "context_tokens_actual": context.shape[1] + question.shape[1],
        "prefill_tok_s": context.shape[1] / prefill_s,
        "decode_tok_s": DECODE_TOKENS / decode_s,
        "events": 0,
        "correct": probe.is_correct(answer),
    }


def _sample_main(spec: str) -> None:
    method, length, haystack, depth, key = json.loads(spec)
    row = run_sample(method, length, haystack, depth, key)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(row), flush=True)


def _plan(lengths, methods, haystacks) -> list[tuple]:
    rng = random.Random(1234)
    plan = []
    for haystack in haystacks:
        for length in lengths:
            keys = [str(rng.randrange(10000, 100000)) for _ in DEPTHS]
            for method in methods:
                for depth, key in zip(DEPTHS, keys, strict=True):
                    full_skipped = length > FULL_ATTENTION_MAX and not _full_speed_sample(length, depth)
                    if method == "full" and full_skipped:
                        continue
                    plan.append((method, length, haystack, depth, key))
    return plan


def _full_speed_sample(length: int, depth: float) -> bool:
    return length == FULL_ATTENTION_SPEED_ONLY and depth == DEPTHS[1]


def _done() -> dict[tuple, dict]:
    if not SAMPLES.exists():
        return {}
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines() if line.strip()]
    return {(r["method"], r["context_tokens"], r["haystack"], r["depth"], r["key"]): r for r in rows}


def _run_plan(plan: list[tuple], timeout: int) -> None:
    done = _done()
    for spec in plan:
        if spec in done:
            continue
        method, length, haystack, depth, key = spec
        print(f"[passkey] {method:12s} {length:>6} {haystack:6s} depth {depth:.1f} ...", end=" ", flush=True)
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--sample", json.dumps(list(spec))],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=ROOT,
            )
        except subprocess.TimeoutExpired:
            print("timed out")
            row = {"error": f"timeout after {timeout} s"}
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print("failed\n" + proc.stderr[-2000:])
                continue
            row = json.loads(lines[-1][len("RESULT ") :])
            print(
                f"{'ok ' if row['correct'] else 'MISS'} {row['answer']!r} "
                f"prefill {row['prefill_tok_s']:.0f} tok/s"
            )
        keys = dict(method=method, context_tokens=length, haystack=haystack, depth=depth, key=key)
        with SAMPLES.open("a") as f:
            f.write(json.dumps(keys | row) + "\n")


def _mean(values):
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), 2) if values else None


def summarise(command: str) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for row in _done().values():
        if "error" in row:
            continue
        groups.setdefault((row["method"], row["context_tokens"], row["haystack"]), []).append(row)
    rows = []
    for (method, length, haystack), samples in sorted(
        groups.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])
    ):
        rows.append(
            {
                "method": method,
                "context_tokens": length,
                "haystack": haystack,
                "n": len(samples),
                "accuracy": round(sum(s["correct"] for s in samples) / len(samples), 3),
                "prefill_tok_s": _mean(s["prefill_tok_s"] for s in samples),
                "decode_tok_s": _mean(s["decode_tok_s"] for s in samples),
                "peak_rss_mb": round(max(s["peak_rss_mb"] for s in samples), 1),
                "memory_device_mb": _mean(s.get("memory_device_mb") for s in samples),
            }
        )
    return {
        "benchmark": "passkey",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32)",
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "config": "emllm: preset smollm2-135m (n_init 64, n_local 1024, n_mem 1024, chunk 256), each layer's "
        "own retrieval as published (question_recall=0); fixed_blocks: same with segmentation='fixed', "
        "block_size 64",
        "rows": rows,
    }


def write_doc(summary: dict) -> None:
    lines = [
        "## Passkey retrieval",
        "",
        f"`{summary['command']}` — {summary['machine']}, {summary['date']}. Model: {summary['model']}.",
        f"Config: {summary['config']}. Full attention = transformers sdpa with its KV cache.",
        "3 depths (10/50/90 %) x 1 key per length; `noise` is the standard filler (raw text), `austen` a",
        "real-text haystack (Pride and Prejudice) through the chat template. Accuracy = key in the answer.",
        "Prefill tok/s over the haystack; decode tok/s over 32 tokens after the answer; peak RSS of the",
        "sample's process; device MB = EM-LLM's device tier (window, init, cache) at the end.",
        "",
        "| haystack | method | context | n | accuracy | prefill tok/s | decode tok/s | peak RSS MB "
        "| device MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['haystack']} | {r['method']} | {r['context_tokens']:,} | {r['n']} | {r['accuracy']:.2f} | "
            f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {r['peak_rss_mb']} | "
            f"{r['memory_device_mb'] or '-'} |"
        )
    replace_section(DOC, "## Passkey retrieval", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--methods", nargs="+", default=["emllm", "fixed_blocks", "full"])
    parser.add_argument("--haystacks", nargs="+", default=["noise", "austen"])
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per sample")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--sample", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample:
        _sample_main(args.sample)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        _run_plan(_plan(args.lengths, args.methods, args.haystacks), args.timeout)
    command = "python benchmarks/passkey.py " + " ".join(a for a in sys.argv[1:] if a != "--summarise-only")
    summary = summarise(command.strip())
    SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    write_doc(summary)
    print(json.dumps(summary["rows"], indent=1))


if __name__ == "__main__":
    main()
