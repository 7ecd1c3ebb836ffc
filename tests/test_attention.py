"""Tests for emllm.attention and emllm.positions: the fast path against the in-package reference, the
exact log-sum-exp merge, GQA folding, received attention against brute force, and rotary tables against
transformers' own RoPE."""

from __future__ import annotations

import os
import signal
import time
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from emllm import attention
from emllm.attention import (
    attend,
    attend_causal_chunk,
    attend_grouped,
    attend_reference,
    merge_partials,
    received_attention,
    set_attention_backend,
)
from emllm.positions import RotaryTable, apply_rotary, find_rotary_embedding
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb


@pytest.fixture
def backend():
    """Force an attention backend for one test; "auto" is restored afterwards, even on failure."""
    yield set_attention_backend
    set_attention_backend("auto")


def _qkv(b, hq, hkv, lq, lk, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _diff(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    d = (actual.double() - expected.double()).abs()
    return d.max().item(), d.mean().item()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    max_diff, mean_diff = _diff(actual, expected)
    assert max_diff <= atol, f"{what}: max diff {max_diff:.3e} (mean {mean_diff:.3e}) > atol {atol:.1e}"


def _causal_mask(lq: int, lk: int) -> torch.Tensor:
    """Bottom-right aligned: query i sees key j iff j <= i + lk - lq."""
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    return j <= i + (lk - lq)


def _manual_attention(q, k, v, scale, mask=None):
    """Softmax attention in float64 over (B,H,L,D) with matching head counts -> (out, lse)."""
    logits = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    return torch.softmax(logits, dim=-1) @ v.double(), lse


# ---------------------------------------------------------------- attend vs reference

SHAPES = [  # (B, H, Lq, Lk, D)
    (1, 2, 5, 5, 8),
    (2, 3, 17, 17, 16),
    (1, 4, 1, 1, 32),
    (1, 1, 33, 33, 64),
]
NONCAUSAL_SHAPES = [*SHAPES, (1, 2, 7, 1, 8), (2, 2, 3, 40, 16), (1, 3, 24, 9, 32)]


def test_backend_names(backend) -> None:
    with pytest.raises(ValueError, match="unknown attention backend"):
        backend("flash3")
    backend("reference")
    backend("auto")


@pytest.mark.parametrize("shape", NONCAUSAL_SHAPES)
def test_attend_matches_reference_noncausal(shape, backend) -> None:
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, h, lq, lk, d, seed=lq * 100 + lk)
    scale = d**-0.5
    backend("auto")
    out, lse = attend(q, k, v, scale, causal=False)
    ref_out, ref_lse = attend_reference(q, k, v, scale, causal=False)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    _assert_close(out, ref_out, 1e-5, f"out {shape}")
    _assert_close(lse, ref_lse, 1e-4, f"lse {shape}")
    manual_out, manual_lse = _manual_attention(q, k, v, scale)
    _assert_close(out, manual_out, 1e-5, f"out vs float64 {shape}")
    _assert_close(lse, manual_lse, 1e-4, f"lse vs float64 {shape}")


@pytest.mark.parametrize("shape", SHAPES)
def test_attend_matches_reference_causal(shape, backend) -> None:
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, h, lq, lk, d, seed=7 + lq)
    scale = d**-0.5
    backend("auto")
    out, lse = attend(q, k, v, scale, causal=True)
    ref_out, ref_lse = attend_reference(q, k, v, scale, causal=True)
    _assert_close(out, ref_out, 1e-5, f"out {shape}")
    _assert_close(lse, ref_lse, 1e-4, f"lse {shape}")
    manual_out, manual_lse = _manual_attention(q, k, v, scale, _causal_mask(lq, lk))
    _assert_close(out, manual_out, 1e-5, f"out vs float64 {shape}")
    _assert_close(lse, manual_lse, 1e-4, f"lse vs float64 {shape}")


@pytest.mark.parametrize(("lq", "lk"), [(1, 6), (4, 9), (5, 5)])
def test_reference_causal_is_bottom_right(lq, lk) -> None:
    q, k, v = _qkv(1, 2, 2, lq, lk, 8, seed=3)
    out, lse = attend_reference(q, k, v, 0.4, causal=True)
    manual_out, manual_lse = _manual_attention(q, k, v, 0.4, _causal_mask(lq, lk))
    _assert_close(out, manual_out, 1e-5, "out")
    _assert_close(lse, manual_lse, 1e-5, "lse")


@pytest.mark.parametrize("causal", [False, True])
def test_auto_takes_fast_path(causal, backend, monkeypatch) -> None:
    """The "auto" backend must not fall back to the reference where the CPU flash kernel applies."""
    if not attention._HAS_CPU_FLASH:
        pytest.skip("this torch has no CPU flash attention kernel")

    def boom(*args, **kwargs):
        raise AssertionError("reference path taken")

    monkeypatch.setattr(attention, "attend_reference", boom)
    backend("auto")
    q, k, v = _qkv(1, 2, 2, 6, 6, 8)
    attend(q, k, v, 0.3, causal=causal)
    backend("reference")
    with pytest.raises(AssertionError, match="reference path taken"):
        attend(q, k, v, 0.3, causal=causal)


def test_reference_backend_is_the_reference(backend) -> None:
    q, k, v = _qkv(2, 2, 2, 9, 9, 16, seed=5)
    backend("reference")
    out, lse = attend(q, k, v, 0.25, causal=True)
    ref_out, ref_lse = attend_reference(q, k, v, 0.25, causal=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize(("shape", "causal"), [((1, 2, 16, 16, 32), True), ((2, 3, 9, 40, 64), False)])
def test_attend_bf16(shape, causal, backend) -> None:
    """bf16 error at most 2x that of torch sdpa in bf16 against an fp32 reference, plus 1e-3."""
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, h, lq, lk, d, seed=11)
    scale = d**-0.5
    ref_out, ref_lse = attend_reference(q, k, v, scale, causal)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    sdpa = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=scale)  # square when causal
    _, upcast_lse = attend_reference(qb, kb, vb, scale, causal)  # only input rounding
    for name in ("auto", "reference"):
        backend(name)
        out, lse = attend(qb, kb, vb, scale, causal)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        _assert_close(out, ref_out, 2 * _diff(sdpa, ref_out)[0] + 1e-3, f"{name} bf16 out")
        _assert_close(lse, ref_lse, 2 * _diff(upcast_lse, ref_lse)[0] + 1e-3, f"{name} bf16 lse")


def _in_child(check, timeout: float = 60.0) -> int:
    """Run check() in a forked child; its exit status (negative: killed by that signal).

    A kernel that crashes the process (SIGFPE) fails one test instead of taking the run down.
    """
    pid = os.fork()
    if pid == 0:  # child: one thread (OpenMP pools do not survive fork), never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            check()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to isolate a crash")
@pytest.mark.parametrize("backend_name", ["auto", "reference"])
def test_attend_over_no_keys(backend_name, backend) -> None:
    """No keys: zero output and lse = -inf, so merge_partials gives the part no weight.

    Reachable from LayerMemory._global_kv when n_init=0 and no event fits in n_mem.
    """
    backend(backend_name)
    q, k, v = _qkv(1, 2, 2, 3, 0, 8)  # (1,2,3,8) queries over (1,2,0,8) keys
    k2, v2 = _qkv(1, 2, 2, 3, 5, 8, seed=1)[1:]

    def check() -> None:
        out, lse = attend(q, k, v, 0.35, causal=False)
        assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1] and bool(torch.isneginf(lse).all())
        merged = merge_partials([(out, lse), attend(q, k2, v2, 0.35, causal=False)])
        expected = attend_reference(q, k2, v2, 0.35, causal=False)
        assert torch.allclose(merged[0], expected[0], atol=1e-5) and torch.allclose(merged[1], expected[1])

    code = _in_child(check)
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code} (1: wrong result)"
    assert code == 0, f"attend over 0 keys ({backend_name}) failed in a child process: {how}"


# ---------------------------------------------------------------- merge_partials


@settings(max_examples=30, deadline=None)
@given(
    lk=st.integers(min_value=3, max_value=24),
    parts=st.integers(min_value=1, max_value=3),
    data=st.data(),
)
def test_merge_partials_equals_full_attention(lk, parts, data) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, lk - 1), min_size=parts - 1, max_size=parts - 1)))
    seed = data.draw(st.integers(0, 2**16))
    q, k, v = _qkv(1, 3, 3, 5, lk, 16, seed=seed)
    q = q * 3  # peaked softmax: the parts' lse differ a lot
    bounds = [0, *cuts, lk]
    partials = [attend(q, k[:, :, a:z], v[:, :, a:z], 0.25, causal=False) for a, z in pairwise(bounds)]
    out, lse = merge_partials(partials)
    full_out, full_lse = _manual_attention(q, k, v, 0.25)
    _assert_close(out, full_out, 1e-5, f"out, cuts {cuts}")
    _assert_close(lse, full_lse, 1e-4, f"lse, cuts {cuts}")


def test_merge_window_and_causal_chunk_is_causal_attention() -> None:
    """The local layout: chunk queries over window keys (no mask) ++ the chunk itself (causal)."""
    w, c = 11, 6
    q, k, v = _qkv(1, 2, 2, c, w + c, 16, seed=4)
    window = attend(q, k[:, :, :w], v[:, :, :w], 0.25, causal=False)
    chunk = attend(q, k[:, :, w:], v[:, :, w:], 0.25, causal=True)
    out, lse = merge_partials([window, chunk])
    full_out, full_lse = _manual_attention(q, k, v, 0.25, _causal_mask(c, w + c))
    _assert_close(out, full_out, 1e-5, "out")
    _assert_close(lse, full_lse, 1e-4, "lse")


def test_merge_partials_keeps_dtype() -> None:
    q, k, v = _qkv(1, 2, 2, 4, 10, 8, seed=9, dtype=torch.bfloat16)
    parts = [attend(q, k[:, :, :4], v[:, :, :4], 0.3, False), attend(q, k[:, :, 4:], v[:, :, 4:], 0.3, False)]
    out, lse = merge_partials(parts)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


# ---------------------------------------------------------------- GQA


@pytest.mark.parametrize("groups", [1, 3, 4])
@pytest.mark.parametrize("backend_name", ["auto", "reference"])
def test_attend_grouped_equals_repeated_kv(groups, backend_name, backend) -> None:
    backend(backend_name)
    hkv, lq, lk, d = 2, 7, 13, 16
    q, k, v = _qkv(2, hkv * groups, hkv, lq, lk, d, seed=groups)
    out, lse = attend_grouped(q, k, v, d**-0.5)
    ref_out, ref_lse = _manual_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), d**-0.5
    )
    _assert_close(out, ref_out, 1e-5, f"out G={groups}")
    _assert_close(lse, ref_lse, 1e-4, f"lse G={groups}")


def test_attend_grouped_noncontiguous_query() -> None:
    """Queries come from transformers as (B,L,H,D).transpose(1, 2): folding must respect head order."""
    q, k, v = _qkv(1, 4, 2, 5, 9, 8, seed=2)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_t.is_contiguous()
    out, lse = attend_grouped(q_t, k, v, 0.3)
    ref_out, ref_lse = attend_grouped(q, k, v, 0.3)
    _assert_close(out, ref_out, 1e-6, "out")
    _assert_close(lse, ref_lse, 1e-6, "lse")


@pytest.mark.parametrize(("hq", "hkv", "c"), [(2, 2, 1), (4, 2, 9), (6, 2, 16)])
def test_attend_causal_chunk_matches_manual(hq, hkv, c) -> None:
    q, k, v = _qkv(1, hq, hkv, c, c, 16, seed=c)
    out, lse = attend_causal_chunk(q, k, v, 0.25)
    groups = hq // hkv
    k_rep, v_rep = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = q.double() @ k_rep.double().transpose(-1, -2) * 0.25
    logits = logits.masked_fill(~torch.ones(c, c, dtype=torch.bool).tril(), float("-inf"))
    manual_out = torch.softmax(logits, dim=-1) @ v_rep.double()
    _assert_close(out, manual_out, 1e-5, "out")
    _assert_close(lse, torch.logsumexp(logits, dim=-1), 1e-4, "lse")


# ---------------------------------------------------------------- received attention


def _received_brute_force(q, window_keys, chunk_keys, lse, scale) -> torch.Tensor:
    hq, c = q.shape[1], q.shape[2]
    hkv, w = window_keys.shape[1], window_keys.shape[2]
    groups = hq // hkv
    received = torch.zeros(w + c, dtype=torch.float64)
    for h in range(hq):
        kv = h // groups
        for i in range(c):
            for j in range(w):
                logit = (q[0, h, i].double() @ window_keys[0, kv, j].double()) * scale
                received[j] += torch.exp(logit - lse[0, h, i].double())
            for j in range(i + 1):
                logit = (q[0, h, i].double() @ chunk_keys[0, kv, j].double()) * scale
                received[w + j] += torch.exp(logit - lse[0, h, i].double())
    return received


@pytest.mark.parametrize(
    ("hq", "hkv", "w", "c", "memory_keys"), [(4, 2, 7, 5, 0), (4, 2, 0, 6, 3), (6, 2, 9, 4, 5)]
)
def test_received_attention_matches_brute_force(hq, hkv, w, c, memory_keys) -> None:
    """lse comes from the merged attention over memory ++ window ++ chunk, as LayerMemory computes it."""
    d, scale = 8, 8**-0.5
    q, keys, _ = _qkv(1, hq, hkv, c, memory_keys + w + c, d, seed=w * 10 + c)
    q = q * 2
    values = torch.zeros(1, hkv, memory_keys + w + c, d)
    mem, window, chunk = keys.split([memory_keys, w, c], dim=2)
    parts = [attend_causal_chunk(q, chunk, values[:, :, :c], scale)]
    if w:
        parts.append(attend_grouped(q, window, values[:, :, :w], scale))
    if memory_keys:
        parts.append(attend_grouped(q, mem, values[:, :, :memory_keys], scale))
    _, lse = merge_partials(parts)
    got = received_attention(q, window, chunk, lse, scale)
    assert got.dtype == torch.float32 and got.shape == (w + c,)
    expected = _received_brute_force(q, window, chunk, lse, scale)
    _assert_close(got, expected, 1e-5, "received mass")
    total = got.sum().item()
    if memory_keys:
        assert total < hq * c - 1e-3, f"memory keys took no probability: {total} vs {hq * c}"
    else:
        assert abs(total - hq * c) < 1e-4, f"each query spreads probability 1: {total} vs {hq * c}"


# ---------------------------------------------------------------- positions


def _transformers_cos_sin(rotary, positions: torch.Tensor):
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1), positions[None])
    return cos, sin  # (1, T, rotary_dim), attention scaling included


def test_rotary_table_matches_transformers_llama() -> None:
    model = tiny_model("llama")
    rotary = find_rotary_embedding(model)
    assert rotary is model.model.rotary_emb
    table = RotaryTable(rotary, 64, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 9, 16, generator=g)
    cos, sin = _transformers_cos_sin(rotary, torch.arange(40, 49))
    expected, _ = llama_apply_rotary_pos_emb(x, x, cos, sin)
    _assert_close(table.rotate(x, 40), expected, 1e-6, "rotate(x, 40)")
    cos_at, sin_at = _transformers_cos_sin(rotary, torch.full((9,), 17))
    expected_at, _ = llama_apply_rotary_pos_emb(x, x, cos_at, sin_at)
    _assert_close(table.rotate_at(x, 17), expected_at, 1e-6, "rotate_at(x, 17)")
    assert torch.equal(table.rotate(x, 0)[..., :1, :], x[..., :1, :]), "position 0 is the identity"


def test_rotary_table_partial_rotary_phi3() -> None:
    model = tiny_model("phi3")
    rotary = find_rotary_embedding(model)
    table = RotaryTable(rotary, 32, torch.device("cpu"))
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert table.rotary_dim == head_dim // 2
    x = torch.randn(1, 2, 6, head_dim, generator=torch.Generator().manual_seed(1))
    out = table.rotate(x, 10)
    assert torch.equal(out[..., table.rotary_dim :], x[..., table.rotary_dim :]), "pass-through dims changed"
    assert not torch.allclose(out[..., : table.rotary_dim], x[..., : table.rotary_dim])
    cos, sin = _transformers_cos_sin(rotary, torch.arange(10, 16))
    expected, _ = phi3_apply_rotary_pos_emb(x, x, cos, sin)
    _assert_close(out, expected, 1e-6, "phi3 rotate")


def test_rotary_table_divides_out_attention_scaling() -> None:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 1e4}
    model = tiny_model("llama", rope_parameters=rope)
    rotary = find_rotary_embedding(model)
    assert rotary.attention_scaling != 1.0
    table = RotaryTable(rotary, 48, torch.device("cpu"))
    assert torch.equal(table.cos[0], torch.ones_like(table.cos[0])), table.cos[0]
    assert torch.equal(table.sin[0], torch.zeros_like(table.sin[0])), table.sin[0]
    cos, sin = _transformers_cos_sin(rotary, torch.arange(48))
    _assert_close(table.cos, cos[0] / rotary.attention_scaling, 1e-6, "cos")
    _assert_close(table.sin, sin[0] / rotary.attention_scaling, 1e-6, "sin")
    # The model's own RoPE at position 0 applies the scaling once; the table then only rotates.
    x = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(2))
    cos0, sin0 = _transformers_cos_sin(rotary, torch.zeros(5, dtype=torch.long))
    scaled, _ = llama_apply_rotary_pos_emb(x, x, cos0, sin0)
    cos_p, sin_p = _transformers_cos_sin(rotary, torch.arange(20, 25))
    expected, _ = llama_apply_rotary_pos_emb(x, x, cos_p, sin_p)
    _assert_close(table.rotate(scaled, 20), expected, 1e-5, "scaling applied once")


def test_rotate_outside_table_raises() -> None:
    table = RotaryTable(find_rotary_embedding(tiny_model("llama")), 16, torch.device("cpu"))
    x = torch.randn(1, 2, 3, 16)
    table.rotate(x, 13)  # positions 13..15: the last that fit
    with pytest.raises(IndexError, match="outside the rotary table"):
        table.rotate(x, 14)
    with pytest.raises(IndexError, match="outside the rotary table"):
        table.rotate(x, -1)
    with pytest.raises(IndexError):
        table.rotate_at(x, 16)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_rotary_dot_product_depends_only_on_offset(arch) -> None:
    table = RotaryTable(find_rotary_embedding(tiny_model(arch)), 128, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(16, generator=g)
    k = torch.randn(16, generator=g)

    def dot(a: int, b: int) -> float:
        return (table.rotate_at(q[None], a) @ table.rotate_at(k[None], b).T).item()

    for offset in (0, 1, 5, 37):
        values = [dot(b + offset, b) for b in (0, 3, 20, 90)]
        spread = max(values) - min(values)
        assert spread < 1e-5, f"offset {offset}: dot products {values} vary by {spread:.2e}"
    assert abs(dot(5, 0) - dot(0, 5)) > 1e-6, "the sign of the offset should matter"


def test_apply_rotary_preserves_norm() -> None:
    table = RotaryTable(find_rotary_embedding(tiny_model("llama")), 64, torch.device("cpu"))
    x = torch.randn(1, 3, 64, 16, generator=torch.Generator().manual_seed(4))
    out = apply_rotary(x, table.cos, table.sin)
    _assert_close(out.norm(dim=-1), x.norm(dim=-1), 1e-5, "norm")
