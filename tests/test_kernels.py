"""Tests for emllm_kernels: every Triton kernel against its torch reference over hypothesis-drawn shapes,
the references against the engine's own torch path, the dispatch rules, and the engine end to end with
kernels="triton" against kernels="torch".

On a CUDA machine (benchmarks/gpu_check.sh) the checks run compiled, on the GPU, in this process. Without
a GPU they run in Triton's interpreter on CPU tensors, which needs TRITON_INTERPRET=1 before the process
first imports triton; the conftest's transformers models import it (through torch._dynamo) before any test
module runs, so the checks go to one spawned worker process whose environment has the variable from its
start. `test_kernels_run_where_expected` proves the interpreter is really in use there.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from conftest import ByteTokenizer, tiny_model
from emllm import EMLLM, EMLLMConfig
from emllm.attention import (
    attend_causal_chunk,
    attend_grouped,
    merge_partials,
    received_attention,
    use_triton_kernels,
)
from emllm.errors import ConfigError
from emllm.retrieval import group_query_for_scoring
from emllm_kernels import (
    KernelUnavailableError,
    episodic_attention,
    episodic_attention_reference,
    event_scores,
    event_scores_reference,
    received_mass,
    received_mass_reference,
)
from emllm_kernels import backend as kernel_backend
from emllm_kernels.episodic_attention import attention_launch_config, merge_splits, plan_splits, split_count
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
GQA_RATIOS = (1, 3, 4, 8)
HEAD_DIMS = (16, 64, 80, 128)  # 80: not a power of two (the kernels mask the padded dims)
FAST = settings(max_examples=15, deadline=None)


def _init_worker() -> None:
    torch.set_num_threads(1)  # tiny tensors; the interpreter's numpy calls gain nothing from threads


@pytest.fixture(scope="module")
def run():
    """run(check, *args): call check where the kernels can run (see the module docstring)."""
    if ON_GPU:
        yield lambda check, *args: check(*args)
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the worker, which starts on the first submit
    try:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn, initializer=_init_worker) as pool:
            yield lambda check, *args: pool.submit(check, *args).result(timeout=600)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    diff = (actual.double() - expected.double()).abs()
    max_diff, mean_diff = diff.max().item(), diff.mean().item()
    assert max_diff <= atol, f"{what}: max diff {max_diff:.3e} (mean {mean_diff:.3e}) > atol {atol:.1e}"


def _randn(*shape: int, dtype: torch.dtype, generator: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * std).to(device=DEVICE, dtype=dtype)


def _attention_inputs(batch, kv_heads, groups, query_len, num_global, window_len, head_dim, dtype, seed=0):
    """q_mem, q_local, k_global, v_global, k_local, v_local for one drawn shape."""
    g = torch.Generator().manual_seed(seed)
    hq = kv_heads * groups
    queries = [_randn(batch, hq, query_len, head_dim, dtype=dtype, generator=g) for _ in range(2)]
    global_kv = [_randn(batch, kv_heads, num_global, head_dim, dtype=dtype, generator=g) for _ in range(2)]
    local_len = window_len + query_len
    local_kv = [_randn(batch, kv_heads, local_len, head_dim, dtype=dtype, generator=g) for _ in range(2)]
    return (*queries, *global_kv, *local_kv)


attention_shapes = st.fixed_dictionaries(
    {
        "batch": st.just(1),
        "kv_heads": st.integers(1, 2),
        "groups": st.sampled_from(GQA_RATIOS),
        "query_len": st.integers(1, 20),
        "num_global": st.one_of(st.just(0), st.just(1), st.integers(2, 150)),
        "window_len": st.one_of(st.just(0), st.integers(1, 150)),
        "head_dim": st.sampled_from(HEAD_DIMS),
    }
)
# explicit edge cases, whatever hypothesis draws: no retrieved tokens, one, a batch, one query (decoding),
# lengths just past the 64-key block, 16-row blocks filled exactly, the largest and a tiny head_dim
EDGE_CASES = [
    dict(batch=1, kv_heads=2, groups=4, query_len=5, num_global=0, window_len=0, head_dim=16),
    dict(batch=1, kv_heads=1, groups=3, query_len=7, num_global=1, window_len=1, head_dim=64),
    dict(batch=2, kv_heads=2, groups=1, query_len=3, num_global=65, window_len=63, head_dim=128),
    dict(batch=1, kv_heads=2, groups=8, query_len=1, num_global=130, window_len=129, head_dim=128),
    dict(batch=1, kv_heads=1, groups=4, query_len=4, num_global=64, window_len=64, head_dim=32),
    dict(batch=1, kv_heads=1, groups=1, query_len=3, num_global=33, window_len=40, head_dim=256),  # largest
    dict(batch=1, kv_heads=2, groups=3, query_len=5, num_global=9, window_len=12, head_dim=8),  # padded to 16
]


def _with_edge_cases(**other_arguments):
    def decorate(test):
        for case in EDGE_CASES:
            test = example(shape=case, **other_arguments)(test)
        return test

    return decorate


# ---------------------------------------------------------------- where the kernels run


def _interpreted_kernels() -> dict[str, bool]:
    import triton.language as tl
    from emllm_kernels._episodic_attention_jit import episodic_attention_kernel
    from emllm_kernels._event_scores_jit import event_scores_kernel
    from emllm_kernels._received_mass_jit import received_mass_kernel

    kernels = (episodic_attention_kernel, received_mass_kernel, event_scores_kernel, tl.zeros, tl.sum)
    return {repr(kernel): kernel_backend.is_interpreted(kernel) for kernel in kernels}


def test_kernels_run_where_expected(run) -> None:
    """Interpreted on CPU (kernels and triton's standard library alike), compiled on CUDA."""
    interpreted = run(_interpreted_kernels)
    assert interpreted == {name: not ON_GPU for name in interpreted}, interpreted


@pytest.mark.skipif(ON_GPU, reason="the CPU interpreter's import-order trap; a GPU run takes CUDA tensors")
def test_interpreter_set_too_late_is_a_clear_error(monkeypatch) -> None:
    """This process imported triton (conftest's transformers models) before TRITON_INTERPRET was set."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape = dict(batch=1, kv_heads=1, groups=2, query_len=3, num_global=2, window_len=4, head_dim=16)
    with pytest.raises(KernelUnavailableError, match="before the process imports triton"):
        episodic_attention(*_attention_inputs(**shape, dtype=torch.float32), 0.25, 4)


def test_package_imports_without_triton_or_cuda() -> None:
    """Importing emllm_kernels (and calling its references) loads neither triton nor CUDA."""
    code = (
        "import sys, torch, emllm_kernels as k\n"
        "q = torch.randn(1, 2, 3, 16); kv = torch.randn(1, 1, 5, 16)\n"
        "k.episodic_attention_reference(q, q, kv[:, :, :2], kv[:, :, :2], kv, kv, 0.25, 2)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------- episodic attention


def _check_attention(shape: dict, dtype: torch.dtype, seed: int = 0) -> None:
    inputs = _attention_inputs(**shape, dtype=dtype, seed=seed)
    scale = shape["head_dim"] ** -0.5
    out, lse = episodic_attention(*inputs, scale, shape["window_len"])
    ref_out, ref_lse = episodic_attention_reference(*inputs, scale, shape["window_len"])
    assert out.dtype == dtype and lse.dtype == torch.float32
    _assert_close(out, ref_out, TOLERANCE[dtype], f"out {dtype} {shape}")
    _assert_close(lse, ref_lse, TOLERANCE[dtype], f"lse {dtype} {shape}")


@FAST
@_with_edge_cases()
@given(shape=attention_shapes)
def test_episodic_attention_fp32(run, shape) -> None:
    run(_check_attention, shape, torch.float32)


@settings(max_examples=8, deadline=None)
@_with_edge_cases(dtype=torch.bfloat16)
@given(shape=attention_shapes, dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_episodic_attention_low_precision(run, shape, dtype) -> None:
    run(_check_attention, shape, dtype)


def _check_split_attention(shape: dict, num_splits: int, dtype: torch.dtype = torch.float32) -> None:
    keys = shape["num_global"] + shape["window_len"] + shape["query_len"]
    block_d = max(16, kernel_backend.next_power_of_2(shape["head_dim"]))
    block_n = attention_launch_config(shape["groups"] * shape["query_len"], block_d)[1]
    assert plan_splits(keys, num_splits, block_n)[0] > 1, "the shape leaves one split: nothing is tested"
    inputs = _attention_inputs(**shape, dtype=dtype, seed=num_splits)
    scale = shape["head_dim"] ** -0.5
    out, lse = episodic_attention(*inputs, scale, shape["window_len"], num_splits=num_splits)
    ref_out, ref_lse = episodic_attention_reference(*inputs, scale, shape["window_len"])
    assert out.dtype == dtype
    _assert_close(out, ref_out, TOLERANCE[dtype], f"out, {num_splits} splits, {shape}")
    _assert_close(lse, ref_lse, TOLERANCE[dtype], f"lse, {num_splits} splits, {shape}")


@settings(max_examples=10, deadline=None)
@example(  # decoding over 130 global + 129 window keys: runs of 128 keys, wholly global, mixed, wholly local
    shape=dict(batch=1, kv_heads=2, groups=4, query_len=1, num_global=130, window_len=129, head_dim=64),
    num_splits=4,
)
@example(  # more splits than key blocks: the launcher keeps only the splits that hold keys
    shape=dict(batch=1, kv_heads=1, groups=2, query_len=3, num_global=75, window_len=70, head_dim=16),
    num_splits=9,
)
@example(  # no global keys, a chunk whose early rows see nothing of the last split (0 and -inf there)
    shape=dict(batch=2, kv_heads=1, groups=3, query_len=20, num_global=0, window_len=50, head_dim=32),
    num_splits=2,
)
@given(
    shape=attention_shapes.filter(lambda s: s["num_global"] + s["window_len"] > 2 * 64),
    num_splits=st.integers(2, 6),
)
def test_episodic_attention_split_kv(run, shape, num_splits) -> None:
    """Keys cut into runs (split-KV, as decoding on a GPU launches) and merged by lse equal one softmax."""
    run(_check_split_attention, shape, num_splits)


def test_episodic_attention_split_kv_low_precision(run) -> None:
    shape = dict(batch=1, kv_heads=2, groups=4, query_len=1, num_global=200, window_len=100, head_dim=128)
    run(_check_split_attention, shape, 3, torch.bfloat16)


def test_split_count_fills_the_gpu_only() -> None:
    """One split on the CPU; on CUDA several when few row blocks meet many keys, one when rows fill it."""
    assert split_count(programs=8, keys=100_000, block_n=64, device=torch.device("cpu")) == 1
    if ON_GPU:
        processors = torch.cuda.get_device_properties(0).multi_processor_count
        assert split_count(8, 100_000, 64, torch.device("cuda")) == processors // 8
        assert split_count(8, 300, 64, torch.device("cuda")) == 1  # too few keys to split
        assert split_count(processors, 100_000, 64, torch.device("cuda")) == 1


def test_merge_splits_is_one_softmax() -> None:
    """Partials over disjoint key runs, merged, equal the softmax over all keys; an empty run weighs 0."""
    g = torch.Generator().manual_seed(3)
    logits, values = torch.randn(2, 5, 12, generator=g), torch.randn(12, 4, generator=g)
    runs = [slice(0, 5), slice(5, 5), slice(5, 12)]
    outs, lses = [], []
    for run_keys in runs:
        part = logits[..., run_keys]
        lse = torch.logsumexp(part, dim=-1) if part.shape[-1] else torch.full(part.shape[:-1], float("-inf"))
        weights = torch.exp(part - lse[..., None]) if part.shape[-1] else part
        outs.append(weights @ values[run_keys] if part.shape[-1] else torch.zeros(2, 5, 4))
        lses.append(lse)
    out, lse = merge_splits(torch.stack(outs), torch.stack(lses))
    _assert_close(out, torch.softmax(logits, dim=-1) @ values, 1e-6, "out")
    _assert_close(lse, torch.logsumexp(logits, dim=-1), 1e-6, "lse")


def test_episodic_attention_peaked_softmax(run) -> None:
    """Large logits (scale 1, values up to ~40) exercise the running-max rescaling of the online softmax."""
    run(_check_peaked_softmax)


def _check_peaked_softmax() -> None:
    shape = dict(batch=1, kv_heads=2, groups=3, query_len=9, num_global=100, window_len=70, head_dim=16)
    inputs = [t * 2.5 for t in _attention_inputs(**shape, dtype=torch.float32, seed=5)]
    out, lse = episodic_attention(*inputs, 1.0, 70)
    ref_out, ref_lse = episodic_attention_reference(*inputs, 1.0, 70)
    _assert_close(out, ref_out, 1e-4, "out")
    _assert_close(lse, ref_lse, 1e-4, "lse")


def test_episodic_attention_accepts_strided_views(run) -> None:
    """Window keys are a view of a larger buffer and queries come transposed from the model."""
    run(_check_strided_views)


def _check_strided_views() -> None:
    shape = dict(batch=1, kv_heads=2, groups=2, query_len=6, num_global=10, window_len=20, head_dim=16)
    q_mem, q_local, kg, vg, kl, vl = _attention_inputs(**shape, dtype=torch.float32, seed=2)
    buffer_k = torch.zeros(1, 2, 50, 16, device=DEVICE)
    buffer_k[:, :, :26] = kl
    q_transposed = q_local.transpose(1, 2).contiguous().transpose(1, 2)  # (B,Hq,L,D) view of (B,L,Hq,D)
    out, lse = episodic_attention(q_mem, q_transposed, kg, vg, buffer_k[:, :, :26], vl, 0.25, 20)
    ref_out, ref_lse = episodic_attention_reference(q_mem, q_local, kg, vg, kl, vl, 0.25, 20)
    _assert_close(out, ref_out, 1e-4, "out")
    _assert_close(lse, ref_lse, 1e-4, "lse")


@pytest.mark.parametrize("fn", [episodic_attention, episodic_attention_reference])
def test_episodic_attention_rejects_bad_shapes(fn) -> None:
    shape = dict(batch=1, kv_heads=2, groups=2, query_len=4, num_global=3, window_len=5, head_dim=16)
    q_mem, q_local, kg, vg, kl, vl = _attention_inputs(**shape, dtype=torch.float32)
    with pytest.raises(ValueError, match="window_len"):
        fn(q_mem, q_local, kg, vg, kl, vl, 0.25, 6)
    with pytest.raises(ValueError, match="not a multiple"):
        fn(q_mem[:, :3], q_local[:, :3], kg, vg, kl, vl, 0.25, 5)


def test_reference_is_the_engine_torch_path() -> None:
    """The kernels' reference equals the engine's three partial attentions merged by log-sum-exp."""
    shape = dict(batch=1, kv_heads=2, groups=3, query_len=11, num_global=37, window_len=29, head_dim=16)
    q_mem, q_local, kg, vg, kl, vl = (t.cpu() for t in _attention_inputs(**shape, dtype=torch.float32))
    window, scale = 29, 0.3
    parts = [
        attend_grouped(q_mem, kg, vg, scale),
        attend_grouped(q_local, kl[:, :, :window], vl[:, :, :window], scale),
        attend_causal_chunk(q_local, kl[:, :, window:], vl[:, :, window:], scale),
    ]
    engine_out, engine_lse = merge_partials(parts)
    ref_out, ref_lse = episodic_attention_reference(q_mem, q_local, kg, vg, kl, vl, scale, window)
    _assert_close(ref_out, engine_out, 1e-5, "out")
    _assert_close(ref_lse, engine_lse, 1e-5, "lse")


# ---------------------------------------------------------------- received mass


def _check_mass(shape: dict, dtype: torch.dtype) -> None:
    inputs = _attention_inputs(**shape, dtype=dtype, seed=1)
    q_local, k_local = inputs[1], inputs[4]
    scale, window = shape["head_dim"] ** -0.5, shape["window_len"]
    _, lse = episodic_attention_reference(*inputs, scale, window)
    mass = received_mass(q_local, k_local, lse, scale, window)
    ref = received_mass_reference(q_local, k_local, lse, scale, window)
    assert mass.dtype == torch.float32 and mass.shape == (shape["batch"], window + shape["query_len"])
    _assert_close(mass, ref, TOLERANCE[dtype], f"mass {dtype} {shape}")


@FAST
@_with_edge_cases()
@given(shape=attention_shapes)
def test_received_mass_fp32(run, shape) -> None:
    run(_check_mass, shape, torch.float32)


@settings(max_examples=6, deadline=None)
@given(shape=attention_shapes)
def test_received_mass_bf16(run, shape) -> None:
    run(_check_mass, shape, torch.bfloat16)


def test_mass_reference_is_the_engine_received_attention() -> None:
    shape = dict(batch=1, kv_heads=2, groups=4, query_len=9, num_global=12, window_len=21, head_dim=16)
    inputs = [t.cpu() for t in _attention_inputs(**shape, dtype=torch.float32, seed=4)]
    q_local, k_local = inputs[1], inputs[4]
    _, lse = episodic_attention_reference(*inputs, 0.25, 21)
    engine = received_attention(q_local, k_local[:, :, :21], k_local[:, :, 21:], lse, 0.25)
    _assert_close(received_mass_reference(q_local, k_local, lse, 0.25, 21)[0], engine, 1e-5, "mass")


def test_received_mass_sums_to_the_local_share(run) -> None:
    """Without global keys every query's probabilities sum to 1 over its local keys."""
    run(_check_mass_sums_to_one_per_query)


def _check_mass_sums_to_one_per_query() -> None:
    shape = dict(batch=1, kv_heads=2, groups=3, query_len=7, num_global=0, window_len=40, head_dim=16)
    inputs = _attention_inputs(**shape, dtype=torch.float32, seed=6)
    _, lse = episodic_attention(*inputs, 0.25, 40)
    mass = received_mass(inputs[1], inputs[4], lse, 0.25, 40)
    assert abs(mass.sum().item() - 2 * 3 * 7) < 1e-3


# ---------------------------------------------------------------- event scores


@settings(max_examples=12, deadline=None)
@given(
    num_events=st.one_of(st.just(0), st.just(1), st.integers(2, 200)),
    kv_heads=st.integers(1, 8),
    groups=st.sampled_from(GQA_RATIOS),
    head_dim=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_event_scores(run, num_events, kv_heads, groups, head_dim, dtype) -> None:
    run(_check_scores, num_events, kv_heads, groups, head_dim, dtype)


def _check_scores(num_events, kv_heads, groups, head_dim, dtype) -> None:
    g = torch.Generator().manual_seed(num_events)
    reprs = _randn(num_events, kv_heads * head_dim, dtype=dtype, generator=g, std=head_dim**-0.5)
    query = _randn(kv_heads * groups, head_dim, dtype=dtype, generator=g)
    scores = event_scores(reprs, query, kv_heads)
    ref = event_scores_reference(reprs, query, kv_heads)
    # fp32 sums over Hkv*D products: the tolerance scales with the scores' magnitude
    atol = TOLERANCE[torch.float32] * max(1.0, ref.abs().max().item() if num_events else 1.0)
    assert scores.dtype == torch.float32
    _assert_close(scores, ref, atol, f"scores E={num_events} Hkv={kv_heads} G={groups} D={head_dim}")


def test_scores_reference_is_the_engine_scoring() -> None:
    g = torch.Generator().manual_seed(0)
    reprs, query = torch.randn(30, 2 * 16, generator=g), torch.randn(1, 8, 16, generator=g)
    engine = reprs @ group_query_for_scoring(query, 2)
    _assert_close(event_scores_reference(reprs, query[0], 2), engine, 1e-5, "scores")


# ---------------------------------------------------------------- dispatch


def test_dispatch_rules(monkeypatch) -> None:
    assert use_triton_kernels("torch", "cuda", 128) is False
    assert use_triton_kernels("auto", "cuda", 128) is True  # triton is installed for these tests
    assert use_triton_kernels("auto", "cuda", 512) is False  # head too large: the torch path
    assert use_triton_kernels("auto", "cpu", 64) is False  # CPU: torch, even under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton_kernels("triton", "cpu", 64) is True
    with pytest.raises(ConfigError, match="head_dim 512"):
        use_triton_kernels("triton", "cuda", 512)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        use_triton_kernels("triton", "cpu", 64)
    monkeypatch.setattr(kernel_backend, "triton_installed", lambda: False)
    assert use_triton_kernels("auto", "cuda", 128) is False
    with pytest.raises(ConfigError, match="triton package is not installed"):
        use_triton_kernels("triton", "cuda", 128)


def test_config_validates_the_switch() -> None:
    assert EMLLMConfig().kernels == "auto"
    with pytest.raises(ValidationError):
        EMLLMConfig(kernels="cuda")


def test_engine_refuses_triton_where_it_cannot_run(monkeypatch, make_engine) -> None:
    """The error comes when the session's memory is built, before any forward."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    engine = make_engine(kernels="triton")
    with pytest.raises(ConfigError, match="kernels='triton' cannot run here"):
        engine.session("s")


def test_launch_refuses_a_kernel_compiled_for_another_device() -> None:
    class CompiledKernel:  # what @triton.jit returns when TRITON_INTERPRET was not set at import
        pass

    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        kernel_backend.check_launchable(CompiledKernel(), torch.zeros(1))
    with pytest.raises(KernelUnavailableError, match="several devices"):
        kernel_backend.check_launchable(CompiledKernel(), torch.zeros(1), torch.zeros(1, device="meta"))


# ---------------------------------------------------------------- the engine end to end

ENGINE_FIELDS = dict(n_init=4, n_local=64, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16)


def _run_engine(model, kernels: str, ids: list[int], memory_positions: str):
    config = EMLLMConfig(**ENGINE_FIELDS, kernels=kernels, memory_positions=memory_positions)
    engine = EMLLM(model, ByteTokenizer(), config)
    session = engine.session("s")
    logits = session.forward(ids)
    generated = session.generate(max_new_tokens=4)
    hits = session.retrieve("the question", k=3)
    return session, logits, generated, hits


@pytest.mark.parametrize("memory_positions", ["fixed", "ordered"])
def test_engine_kernels_equal_torch_path(run, memory_positions) -> None:
    """Prefill with eviction and retrieval, greedy decoding and retrieval probes: same numbers either way."""
    run(_check_engine_equivalence, memory_positions)


def _check_engine_equivalence(memory_positions: str) -> None:
    model = tiny_model(seed=3).to(DEVICE)
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    torch_run = _run_engine(copy.deepcopy(model), "torch", ids, memory_positions)
    torch_session, torch_logits, torch_text, torch_hits = torch_run
    kernel_run = _run_engine(model, "triton", ids, memory_positions)
    kernel_session, kernel_logits, kernel_text, kernel_hits = kernel_run
    assert all(layer.use_kernels for layer in kernel_session.layers)
    assert not any(layer.use_kernels for layer in torch_session.layers)
    assert kernel_session.timeline.events, "nothing was evicted: retrieval was not exercised"
    assert all(layer._selection for layer in kernel_session.layers), "no layer retrieved an event"
    _assert_close(kernel_logits, torch_logits, 1e-4, "prefill logits")
    assert kernel_text == torch_text
    assert [h.event_id for h in kernel_hits] == [h.event_id for h in torch_hits]
    for kernel_layer, torch_layer in zip(kernel_session.layers, torch_session.layers, strict=True):
        assert kernel_layer._selection == torch_layer._selection
        length = torch_layer.length
        _assert_close(kernel_layer.mass[:length], torch_layer.mass[:length], 1e-4, "received mass")
