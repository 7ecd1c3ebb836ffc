"""RULER-style synthetic tasks: EM-LLM (S, SM, SC) vs fixed blocks (InfLLM) vs full attention, SmolLM2-135M.

Tasks (benchmarks/ruler_tasks.py): niah_single on repeated noise and on Austen, niah_multikey and
niah_multivalue on Austen, variable tracking (1 chain, 4 hops) on noise; scored with RULER's
string_match_all. Every method reads the same samples. Each episodic method is answered twice from one
read: as published (every layer retrieves alone: question_recall=0) and with question recall (`+qr`: the
question's top events from the upper layers attended first by every layer, the engine's default). Each
(sample, segmentation) runs in its own subprocess and its rows are appended to a JSONL log at once, so an
interrupted run resumes where it stopped. Aggregates go to <results>/ruler.json, a table in
docs/benchmarks.md and a plot in docs/img/ruler.png.

The whole grid takes hours on 2 cores, so it runs as several commands, all appending to the same
sample log; the docs table shows every cell. The committed grid (n=1 per cell) came from:

    python benchmarks/ruler.py --threads 1 --samples 1                # 8k, every method
    python benchmarks/ruler.py --lengths 16384 --samples 1 --threads 1 --methods emllm_S fixed_blocks
    python benchmarks/ruler.py --lengths 32768 --samples 1 --threads 1 --methods emllm_S fixed_blocks
    python benchmarks/ruler.py --lengths 65536 --samples 1 --threads 1 --methods emllm_S fixed_blocks
    python benchmarks/ruler.py --tasks niah_single:noise niah_single:austen niah_multikey:austen \
        niah_multivalue:austen --lengths 131072 --samples 1 --threads 1 --methods emllm_S --timeout 7200

8k and 16k were read before question recall existed; their +qr answers came from the same commands
with `--methods emllm_S+qr fixed_blocks+qr`. A 128k read takes about 35 minutes on one thread. A quick
trial that leaves docs/ alone:

    python benchmarks/ruler.py --tasks niah_single:noise vt:noise --lengths 4096 --samples 1 --threads 1 \
        --results-dir /tmp/ruler

`--methods emllm_S` runs emllm_S and emllm_S+qr (one read); name `emllm_S+qr` alone for only that one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

from report import ROOT, add_output_arguments, machine, outputs, replace_section

AUSTEN = ROOT / "benchmarks" / "data" / "austen_pride_and_prejudice.txt"
SECTION = "## RULER-style synthetic tasks"
MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32)"
# Reads: overrides of the smollm2-135m preset (n_init 64, n_local 1024, n_mem 1024, chunk 256); None = full.
READS: dict[str, dict | None] = {
    "emllm_S": {"refinement": "none"},
    "emllm_SM": {"refinement": "modularity"},
    "emllm_SC": {"refinement": "conductance"},
    "fixed_blocks": {"segmentation": "fixed"},
    "full": None,
}
QUESTION_RECALL = "+qr"  # suffix: the same read, answered with the engine's question recall
METHODS = [*READS, *(read + QUESTION_RECALL for read, overrides in READS.items() if overrides is not None)]
FULL_ATTENTION_MAX = 16384  # full attention degenerates past the 8k trained context and costs O(n^2)
ONLY_S_ABOVE = 65536  # DESIGN budget: the 128k rows are EM-LLM (S) only


def read_of(method: str) -> str:
    return method.removesuffix(QUESTION_RECALL)


def run_sample(task: str, haystack: str, length: int, index: int, methods: list[str]) -> dict[str, dict]:
    """One sample in this process: build the prompt, read it once (the methods share one read), answer
    with each method, score. -> {method: row}"""
    from emllm.models import load_model
    from ruler_tasks import make_sample

    model, tokenizer = load_model()
    text = AUSTEN.read_text() if haystack == "austen" else None
    sample = make_sample(
        tokenizer, task, haystack, length, seed=sample_seed(task, haystack, length, index), text=text
    )
    if read_of(methods[0]) == "full":
        answer, prefill_s = _answer_full(model, tokenizer, sample)
        answers, events = {"full": answer}, 0
    else:
        answers, prefill_s, events = _answer_emllm(model, tokenizer, sample, methods)
    common = {
        "answers": list(sample.answers),
        "depths": list(sample.depths),
        "prompt_tokens": sample.prompt_tokens,
        "prefill_tok_s": sample.prompt_tokens / prefill_s,  # context and question, read before answering
        "events": events,
    }
    return {
        method: {"answer": answer, "score": sample.score(answer), **common}
        for method, answer in answers.items()
    }


def sample_seed(task: str, haystack: str, length: int, index: int) -> int:
    """The same sample for every method (and every run)."""
    return zlib.crc32(f"{task}:{haystack}:{length}:{index}".encode())


def _answer_emllm(model, tokenizer, sample, methods: list[str]) -> tuple[dict[str, str], float, int]:
    """Read the context once, then answer with each method, cutting the session back to the context
    between answers. The published method (no +qr) answers first, as it did when it was run alone."""
    from emllm import EMLLM, EMLLMConfig

    config = EMLLMConfig.preset("smollm2-135m", **READS[read_of(methods[0])])
    session = EMLLM(model, tokenizer, config, name="smollm2-135m-instruct").session()
    start = time.perf_counter()
    session.feed(sample.context, progress=False)
    prefill_s = time.perf_counter() - start
    events, read = session.stats().events, len(session.token_ids)
    answers = {}
    for method in sorted(methods, key=lambda m: m.endswith(QUESTION_RECALL)):
        recall = None if method.endswith(QUESTION_RECALL) else 0  # None: the config's question_recall
        answers[method] = session.generate(
            sample.question, max_new_tokens=sample.max_new_tokens, question_recall=recall
        )
        session.truncate(read)
    return answers, prefill_s, events


def _answer_full(model, tokenizer, sample) -> tuple[str, float]:
    """Full attention (sdpa) with transformers' KV cache, greedy, same token ids as the engine reads."""
    import torch

    model.set_attn_implementation("sdpa")
    ids = tokenizer.encode(sample.context, add_special_tokens=False)
    ids += tokenizer.encode(sample.question, add_special_tokens=False)
    eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
    out_ids: list[int] = []
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        prefill_s = time.perf_counter() - start
        for _ in range(sample.max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token in eos:
                break
            out_ids.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokenizer.decode(out_ids, skip_special_tokens=True), prefill_s


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# -- the run ------------------------------------------------------------------------------------------
def plan(cases: list[tuple[str, str]], lengths: list[int], methods: list[str], samples: int) -> list[tuple]:
    """(task, haystack, length, index, [methods sharing one read]) in run order."""
    wanted = []
    for method in methods:  # a published method brings its +qr twin (one read answers both)
        twin = method + QUESTION_RECALL
        wanted += [method, twin] if twin in METHODS else [method]
    out = []
    for task, haystack in cases:
        for length in lengths:
            for index in range(samples):
                for read in READS:
                    group = [m for m in dict.fromkeys(wanted) if read_of(m) == read]
                    if read == "full" and length > FULL_ATTENTION_MAX:
                        continue
                    if length > ONLY_S_ABOVE and read != "emllm_S":
                        continue
                    if group:
                        out.append((task, haystack, length, index, group))
    return out


def _key(row: dict) -> tuple:
    return row["task"], row["haystack"], row["context_tokens"], row["index"], row["method"]


def _done(samples_path: Path) -> dict[tuple, dict]:
    if not samples_path.exists():
        return {}
    rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    return {_key(r): r for r in rows}


def run_plan(todo: list[tuple], samples_path: Path, timeout: int, threads: int | None) -> None:
    done = _done(samples_path)
    for task, haystack, length, index, group in todo:
        methods = [m for m in group if (task, haystack, length, index, m) not in done]
        if not methods:
            continue
        print(f"[ruler] {task:16s} {haystack:6s} {length:>6} #{index} {' '.join(methods)} ...", flush=True)
        rows = _run_subprocess((task, haystack, length, index, methods), timeout, threads)
        keys = dict(task=task, haystack=haystack, context_tokens=length, index=index)
        with samples_path.open("a") as f:
            for method, row in rows.items():
                f.write(json.dumps(keys | {"method": method} | row) + "\n")


def _run_subprocess(spec: tuple, timeout: int, threads: int | None) -> dict[str, dict]:
    command = [sys.executable, __file__, "--sample", json.dumps(list(spec))]
    if threads:
        command += ["--threads", str(threads)]
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        print("    timed out")
        return {method: {"error": f"timeout after {timeout} s"} for method in spec[-1]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        print("    failed\n" + proc.stderr[-2000:])
        return {}
    rows = json.loads(lines[-1][len("RESULT ") :])
    for method, row in rows.items():
        print(
            f"    {method:16s} score {row['score']:.2f} {row['answer'][:50]!r} "
            f"prefill {row['prefill_tok_s']:.0f} tok/s"
        )
    return rows


def _sample_main(spec: str, threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    rows = run_sample(*json.loads(spec))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the read's, shared
    print(
        "RESULT " + json.dumps({m: row | {"peak_rss_mb": peak_rss_mb} for m, row in rows.items()}), flush=True
    )


# -- results ------------------------------------------------------------------------------------------
def summarise(samples_path: Path, commands: list[str], threads: int | None) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for row in _done(samples_path).values():
        if "error" not in row:
            key = (row["task"], row["haystack"], row["method"], row["context_tokens"])
            groups.setdefault(key, []).append(row)
    order = list(METHODS)
    rows = [
        {
            "task": task,
            "method": method,
            "haystack": haystack,
            "context_tokens": length,
            "n": len(rows),
            "score": round(statistics.fmean(r["score"] for r in rows), 3),
            "prefill_tok_s": round(statistics.fmean(r["prefill_tok_s"] for r in rows), 1),
        }
        for (task, haystack, method, length), rows in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], order.index(kv[0][2]))
        )
    ]
    return {
        "benchmark": "ruler",
        "model": MODEL,
        "machine": machine(threads),
        "date": datetime.date.today().isoformat(),
        "commands": commands,
        "config": "preset smollm2-135m (n_init 64, n_local 1024, n_mem 1024, chunk 256); emllm_S = surprise, "
        "no refinement; emllm_SM / emllm_SC = surprise + modularity / conductance refinement; fixed_blocks = "
        "segmentation='fixed', 64-token blocks, same budget; these answer as published "
        "(question_recall=0: every layer retrieves alone); X+qr = the same read answered with question "
        "recall (question_recall=16, the default: the question's top 16 events by the upper 15 layers are "
        "attended first by every layer)",
        "rows": rows,
    }


def _commands(summary_path: Path, command: str, record: bool) -> list[str]:
    """Every command whose samples the log holds (runs of one grid accumulate in one sample log)."""
    previous = json.loads(summary_path.read_text()).get("commands", []) if summary_path.exists() else []
    if record and command not in previous:
        return [*previous, command]
    return previous or [command]


def write_doc(summary: dict, doc: Path, plot: Path | None) -> None:
    methods = [m for m in METHODS if any(r["method"] == m for r in summary["rows"])]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in summary["rows"]:
        cells.setdefault((r["task"], r["haystack"], r["context_tokens"]), {})[r["method"]] = r
    lines = [
        SECTION,
        "",
        "; ".join(f"`{c}`" for c in summary["commands"])
        + f" — {summary['machine']}, {summary['date']}. Model: {summary['model']}.",
        f"Config: {summary['config']}. Full attention = transformers sdpa with its KV cache, up to "
        f"{FULL_ATTENTION_MAX:,} tokens.",
        "Tasks follow NVIDIA RULER (templates, needles, 40-point depth grid, string_match_all):",
        "niah_single on repeated noise (RULER niah_single_1) and on Austen (niah_single_2, whose essay",
        "haystack becomes Pride and Prejudice), niah_multikey (4 keys, 1 asked) and niah_multivalue",
        "(4 values) on Austen, vt (1 chain of 4 hops, one-shot example) on noise. Prompts go through",
        "the chat template, RULER's answer prefix opening the assistant turn. Score = mean share of the",
        "expected values found in the answer (0-1); `n` samples per cell, the same samples for every method.",
        "",
        "| task | haystack | context | " + " | ".join(methods) + " |",
        "|---|---|---:|" + "---:|" * len(methods),
    ]
    for (task, haystack, length), by_method in cells.items():
        row = [
            f"{by_method[m]['score']:.2f} (n={by_method[m]['n']})" if m in by_method else "-" for m in methods
        ]
        lines.append(f"| {task} | {haystack} | {length:,} | " + " | ".join(row) + " |")
    lines += ["", *_mean_table(summary["rows"], methods)]
    if plot is not None:
        lines += ["", f"![RULER scores by context length]({os.path.relpath(plot, doc.parent)})"]
    replace_section(doc, SECTION, "\n".join(lines) + "\n")


def _austen_means(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Mean score per length and method over the Austen tasks, for methods that have every one of them."""
    by_cell: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["haystack"] == "austen":
            by_cell.setdefault((r["context_tokens"], r["task"]), {})[r["method"]] = r
    means: dict[int, dict[str, float]] = {}
    for length in sorted({length for length, _ in by_cell}):
        cells = [cell for (cell_length, _), cell in by_cell.items() if cell_length == length]
        means[length] = {
            method: statistics.fmean(cell[method]["score"] for cell in cells)
            for method in METHODS
            if all(method in cell for cell in cells)
        }
    return means


def _mean_table(rows: list[dict], methods: list[str]) -> list[str]:
    lines = [
        "Mean over the Austen tasks (niah_single, niah_multikey, niah_multivalue), per length, where a",
        "method has every one of them:",
        "",
        "| context | " + " | ".join(methods) + " |",
        "|---:|" + "---:|" * len(methods),
    ]
    for length, by_method in _austen_means(rows).items():
        means = [f"{by_method[m]:.2f}" if m in by_method else "-" for m in methods]
        lines.append(f"| {length:,} | " + " | ".join(means) + " |")
    return lines


def write_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}  # panel title -> method -> points
    for r in summary["rows"]:
        title = f"{r['task']} ({r['haystack']})"
        curves.setdefault(title, {}).setdefault(r["method"], []).append((r["context_tokens"], r["score"]))
    curves = dict(sorted(curves.items()))
    for length, by_method in _austen_means(summary["rows"]).items():
        for method, score in by_method.items():
            curves.setdefault("mean over the Austen tasks", {}).setdefault(method, []).append((length, score))
    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(curves) :]:
        ax.set_visible(False)
    colours = {read: f"C{i}" for i, read in enumerate(READS)}
    for ax, (title, by_method) in zip(axes.flat, curves.items(), strict=False):
        for method in (m for m in METHODS if m in by_method):
            style = "--" if method.endswith(QUESTION_RECALL) else "-"
            points = sorted(by_method[method])
            ax.plot(
                *zip(*points, strict=True), style, marker="o", color=colours[read_of(method)], label=method
            )
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("context tokens")
        ax.set_ylim(-0.05, 1.05)
    for ax in axes[:, 0]:
        ax.set_ylabel("string_match_all")
    axes.flat[0].legend(fontsize=7, handlelength=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_cases(items: list[str] | None) -> list[tuple[str, str]]:
    from ruler_tasks import TASKS

    if not items:
        return [(task, haystack) for task, spec in TASKS.items() for haystack in spec.haystacks]
    cases = []
    for item in items:
        task, _, haystack = item.partition(":")
        if task not in TASKS:
            raise SystemExit(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        cases.append((task, haystack or TASKS[task].haystacks[0]))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", help="task[:haystack] items; default: every task, RULER haystacks"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=2, help="samples per (task, haystack, length)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per sample")
    add_output_arguments(parser)
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--sample", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample:
        _sample_main(args.sample, args.threads)
        return
    out, doc, images = outputs(args.results_dir)
    samples_path = out / "ruler.samples.jsonl"
    if not args.summarise_only:
        run_plan(
            plan(_parse_cases(args.tasks), args.lengths, args.methods, args.samples),
            samples_path,
            args.timeout,
            args.threads,
        )
    command = "python benchmarks/ruler.py " + " ".join(a for a in sys.argv[1:] if a != "--summarise-only")
    summary_path = out / "ruler.json"
    commands = _commands(summary_path, command.strip(), record=not args.summarise_only)
    summary = summarise(samples_path, commands, args.threads)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    plot = images / "ruler.png"
    if summary["rows"]:
        write_plot(summary, plot)
    write_doc(summary, doc, plot if summary["rows"] else None)
    print(json.dumps(summary["rows"], indent=1))


if __name__ == "__main__":
    main()
