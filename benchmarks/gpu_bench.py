"""GPU benchmark for the Triton kernels: a randomly initialised Llama-3-8B-shaped model (bf16, built on the
GPU; speed does not depend on the weights) read by EM-LLM on the kernels, EM-LLM on the torch path, and
full attention (transformers' sdpa), plus two micro-benchmarks: one layer's attention over the same number
of keys (fused kernel / materialised torch / sdpa) and event scoring (+ top-k, + the engine's selection).

Every row is written to the JSON file as soon as it is measured (a run killed by its timeout keeps what it
measured). Rows that would not finish in the time budget are listed under "skipped", with the estimate.

    python benchmarks/gpu_bench.py --out benchmarks/results/gpu.json --budget-s 280   # on a GPU
    python benchmarks/gpu_bench.py --tiny --out /tmp/gpu_tiny.json                   # CPU smoke run
    TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --tiny --out /tmp/gpu_tiny.json # ... kernel rows too

Run from the repository root with PYTHONPATH=core:triton_kernels:. (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    bos_token_id=128000,
    eos_token_id=128001,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    eos_token_id=1,
)
TINY_EMLLM = dict(n_init=4, n_local=128, n_mem=64, chunk_size=32, min_event_size=4, max_event_size=32)
EMLLM_METHODS = {"emllm_triton": "triton", "emllm_torch": "torch"}


class Results:
    """The results file, rewritten atomically after every row."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "rows": [], "kernel_rows": [], "scoring_rows": [], "skipped": []}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        self.flush()
        print(section, json.dumps(row), flush=True)

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


class Clock:
    """Seconds left of the run's budget."""

    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


class PlaceholderTokenizer:
    """Token ids in, one placeholder character per token out: the benchmark never reads text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "." * len(ids)

    def __call__(self, text: str, **kwargs):
        raise NotImplementedError("the benchmark feeds token ids only")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, warmup=2, iters=5) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def environment(device: torch.device) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "device": gpu or platform.processor() or "cpu",
    }


# ---------------------------------------------------------------- micro-benchmarks


def attention_inputs(keys: int, heads: tuple[int, int, int], chunk: int, window: int, device, dtype):
    """One layer's episodic attention over `keys` keys: the window and the chunk, the rest global."""
    hq, hkv, d = heads
    window = min(window, keys - chunk)
    num_global = keys - chunk - window

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    q_mem, q_local = randn(1, hq, chunk, d), randn(1, hq, chunk, d)
    k_global, v_global = randn(1, hkv, num_global, d), randn(1, hkv, num_global, d)
    k_local, v_local = randn(1, hkv, window + chunk, d), randn(1, hkv, window + chunk, d)
    return (q_mem, q_local, k_global, v_global, k_local, v_local), window


def bench_attention(results: Results, keys_list, heads, chunk, window, device, dtype, use_kernels) -> None:
    """Rows {"method", "keys", "queries", "tok_s"}: queries per second through one layer's attention, for a
    chunk of `queries` (a prefill chunk, or 1 when decoding; there the fused kernel is also timed with its
    keys in one split, which shows what split-KV gains)."""
    from emllm_kernels import episodic_attention, episodic_attention_reference

    hq, hkv, d = heads
    scale = d**-0.5
    for keys in keys_list:
        inputs, w = attention_inputs(keys, heads, chunk, window, device, dtype)
        q = inputs[1]
        k_all = torch.randn(1, hkv, keys, d, device=device, dtype=dtype).repeat_interleave(hq // hkv, dim=1)
        v_all = torch.randn_like(k_all)
        methods = {
            "kernel_torch_materialised": lambda inputs=inputs, w=w: episodic_attention_reference(
                *inputs, scale, w
            ),
            "kernel_sdpa": lambda q=q, k=k_all, v=v_all: F.scaled_dot_product_attention(q, k, v, scale=scale),
        }
        if use_kernels:
            methods["kernel_fused"] = lambda inputs=inputs, w=w: episodic_attention(*inputs, scale, w)
            if chunk == 1:
                methods["kernel_fused_one_split"] = lambda inputs=inputs, w=w: episodic_attention(
                    *inputs, scale, w, num_splits=1
                )
        for method, fn in methods.items():
            row = {"method": method, "keys": keys, "queries": chunk}
            try:
                results.add("kernel_rows", row | {"tok_s": round(chunk / seconds_per_call(fn, device), 1)})
            except torch.cuda.OutOfMemoryError as exc:
                results.add("kernel_rows", row | {"error": repr(exc)[:200]})
        del inputs, k_all, v_all
        reset_peak(device)


def bench_scoring(results: Results, events_list, heads, budget, device, use_kernels) -> None:
    """Rows {"method", "events", "us"}: scoring + top-k, and the engine's whole selection."""
    from emllm.retrieval import group_query_for_scoring, select_events
    from emllm_kernels import event_scores

    hq, hkv, d = heads

    def torch_topk(reprs, query, k):
        return torch.topk(reprs @ group_query_for_scoring(query, hkv), k)

    def kernel_topk(reprs, query, k):
        return torch.topk(event_scores(reprs, query[0], hkv), k)

    def selection(reprs, query, sizes):
        return select_events(reprs @ group_query_for_scoring(query, hkv), sizes, budget, 0.3)

    for events in events_list:
        reprs = torch.randn(events, hkv * d, device=device)
        query = torch.randn(1, hq, d, device=device, dtype=torch.bfloat16)
        sizes = torch.randint(8, 129, (events,))
        top = min(64, events)
        methods = {
            "score_torch_topk": partial(torch_topk, reprs, query, top),
            "select_events": partial(selection, reprs, query, sizes),
        }
        if use_kernels:
            methods["score_kernel_topk"] = partial(kernel_topk, reprs, query, top)
        for method, fn in methods.items():
            seconds = seconds_per_call(fn, device, iters=20)
            results.add("scoring_rows", {"method": method, "events": events, "us": round(seconds * 1e6, 1)})


# ---------------------------------------------------------------- the model


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Llama, built directly on the device in its dtype (no hub, no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run_emllm(model, config, tokens: list[int], decode_tokens: int, device) -> dict:
    from emllm import EMLLM

    engine = EMLLM(model, PlaceholderTokenizer(), config, name="llama-3-8b-shaped-random")
    session = engine.session()
    start = time.perf_counter()
    session.feed(tokens, progress=False)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    session.generate(max_new_tokens=decode_tokens + 1, ignore_eos=True)  # the first token needs no forward
    synchronize(device)
    decode_s = time.perf_counter() - start
    stats = session.stats()
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "events": stats.events,
        "device_tier_mb": round(stats.device_bytes / 2**20, 1),
        "cpu_tier_mb": round(stats.cpu_bytes / 2**20, 1),
    }


def run_full(model, tokens: list[int], decode_tokens: int, device) -> dict:
    """transformers' own sdpa attention over the whole context: one prefill forward, then its KV cache."""
    from transformers import DynamicCache

    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
    model.set_attn_implementation("sdpa")
    cache = DynamicCache()
    ids = torch.tensor([tokens], device=device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        synchronize(device)
        prefill_s = time.perf_counter() - start
        next_id = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=next_id, past_key_values=cache, use_cache=True)
            next_id = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        decode_s = time.perf_counter() - start
    return {"prefill_s": prefill_s, "decode_s": decode_s}


def bench_model(results: Results, clock: Clock, args, device, dtype, emllm_config, use_kernels) -> None:
    """Rows {"method", "context_tokens", "prefill_tok_s", "decode_tok_s", "peak_gpu_mb"} + details."""
    model = build_model(TINY if args.tiny else LLAMA3_8B, device, dtype)
    vocab = model.config.vocab_size
    seconds_per_token: dict[str, float] = {}
    for context, method in plan(args):
        if method == "emllm_triton" and not use_kernels:
            results.add("skipped", {"method": method, "context_tokens": context, "reason": "no Triton here"})
            continue
        estimate = seconds_per_token.get(method, 0.0) * context * 1.15 + 10
        if estimate > clock.left():
            reason = f"time budget: needs ~{estimate:.0f} s, {clock.left():.0f} s left"
            results.add("skipped", {"method": method, "context_tokens": context, "reason": reason})
            continue
        generator = torch.Generator().manual_seed(context)
        tokens = torch.randint(2, vocab, (context,), generator=generator).tolist()
        reset_peak(device)
        try:
            if method in EMLLM_METHODS:
                config = emllm_config.model_copy(update={"kernels": EMLLM_METHODS[method]})
                measured = run_emllm(model, config, tokens, args.decode_tokens, device)
            else:
                measured = run_full(model, tokens, args.decode_tokens, device)
        except torch.cuda.OutOfMemoryError as exc:
            results.add("rows", {"method": method, "context_tokens": context, "error": repr(exc)[:300]})
            continue
        finally:
            reset_peak(device) if device.type == "cuda" else gc.collect()
        seconds_per_token[method] = measured["prefill_s"] / context
        row = {
            "method": method,
            "context_tokens": context,
            "prefill_tok_s": round(context / measured.pop("prefill_s"), 1),
            "decode_tok_s": round(args.decode_tokens / measured.pop("decode_s"), 2),
            "peak_gpu_mb": peak_mb(device),
        }
        results.add("rows", row | measured)


def plan(args) -> list[tuple[int, str]]:
    """(context, method) in order of importance: every method at the shortest context first, full attention
    only up to --full-max, EM-LLM on the torch path only up to --torch-max."""
    order = []
    for context in args.contexts:
        for method in ("emllm_triton", "full_sdpa", "emllm_torch"):
            if method == "full_sdpa" and context > args.full_max:
                continue
            if method == "emllm_torch" and context > args.torch_max:
                continue
            order.append((context, method))
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny model and sizes: a CPU smoke run, of the kernel rows too "
        "when TRITON_INTERPRET=1 is set as the process starts (the kernels then run in Triton's interpreter)",
    )
    parser.add_argument("--contexts", type=int, nargs="+", help="default: 32k 128k 512k (tiny: 512 1024)")
    parser.add_argument("--full-max", type=int, default=131072, help="longest context for full attention")
    parser.add_argument("--torch-max", type=int, default=131072, help="longest context for the torch path")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=280.0, help="skip rows that would end past this")
    args = parser.parse_args()
    if args.contexts is None:
        args.contexts = [512, 1024] if args.tiny else [32768, 131072, 524288]

    from emllm import EMLLMConfig
    from emllm.attention import use_triton_kernels
    from emllm_kernels import interpreter_requested

    clock = Clock(args.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA device: the 8B-shaped run needs a GPU (--tiny is the CPU smoke run)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if args.tiny else LLAMA3_8B
    heads = (shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"])
    smoke_kernels = args.tiny and device.type == "cpu" and interpreter_requested()
    use_kernels = use_triton_kernels("triton" if smoke_kernels else "auto", device, heads[2])
    emllm_config = EMLLMConfig(**TINY_EMLLM) if args.tiny else EMLLMConfig.preset("llama-3-8b")
    meta = {
        "env": environment(device),
        "model": "tiny random Llama" if args.tiny else "random Llama-3-8B shape (32 layers, 32/8 heads)",
        "dtype": str(dtype).removeprefix("torch."),
        "emllm_config": emllm_config.model_dump(mode="json"),
        "kernels_usable": use_kernels,
    }
    results = Results(args.out, meta)
    chunk, window = emllm_config.chunk_size, emllm_config.n_local
    attended = emllm_config.n_init + emllm_config.n_mem + window + chunk
    keys = [window + chunk, attended, 4 * attended] if not args.tiny else [window + chunk, attended]
    bench_attention(results, keys, heads, chunk, window, device, dtype, use_kernels)
    bench_attention(results, keys[1:], heads, 1, window, device, dtype, use_kernels)  # decoding
    events = [1024, 16384, 65536] if not args.tiny else [64, 512]
    bench_scoring(results, events, heads, emllm_config.n_mem, device, use_kernels)
    bench_model(results, clock, args, device, dtype, emllm_config, use_kernels)
    print(f"done: {args.out}", flush=True)


if __name__ == "__main__":
    main()
