"""The jitted episodic attention forward (imported on first launch; see backend.py for why).

One program = BLOCK_M folded query rows of one (batch, KV head): rows r = g * L + i for the G query heads
sharing that KV head, so K/V are read once per group and never repeated. Online softmax in base 2.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def dot(a, b, IEEE_FP32: tl.constexpr):
    """a @ b accumulated in fp32. IEEE_FP32: exact fp32 products (fp32 inputs, where TF32 would lose
    the 1e-4 contract; and the interpreter, which cannot multiply bfloat16)."""
    if IEEE_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def attend_key_range(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, stop,
    pos, dims, dim_ok, causal_end, scale_log2,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_FP32: tl.constexpr,
):  # fmt: skip
    """Fold keys [start, stop) into the running (acc, m_i, l_i).

    CAUSAL: the row of query i sees key j iff j < causal_end + i."""
    for block_start in range(start, stop, BLOCK_N):
        cols = block_start + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        # -- scores in log2 units: (BLOCK_M, BLOCK_N)
        k_mask = dim_ok[:, None] & col_ok[None, :]
        k_t = tl.load(k_base + cols[None, :] * stride_kn + dims[:, None], mask=k_mask)  # (BLOCK_D, BLOCK_N)
        s = dot(q, k_t, IEEE_FP32) * scale_log2
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] < causal_end + pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        # -- update m_i and l_i; m_i starts finite, so a row with no visible key in a block stays NaN-free
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- update the output accumulator
        v_mask = col_ok[:, None] & dim_ok[None, :]
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :], mask=v_mask)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE_FP32)
        m_i = m_new
    return acc, m_i, l_i


# lengths change with every chunk: specialising on them (==1, divisible by 16) would recompile mid-stream
@triton.jit(do_not_specialize=["query_len", "num_global", "num_local", "window_len"])
def episodic_attention_kernel(
    QM, QL, KG, VG, KL, VL, OUT, LSE,
    s_qm_b, s_qm_h, s_qm_l, s_ql_b, s_ql_h, s_ql_l,
    s_kg_b, s_kg_h, s_kg_n, s_vg_b, s_vg_h, s_vg_n,
    s_kl_b, s_kl_h, s_kl_n, s_vl_b, s_vl_h, s_vl_n,
    s_o_b, s_o_h, s_o_l,
    num_kv_heads, query_len, num_global, num_local, window_len, head_dim, scale_log2,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # folded rows g * L + i
    row_ok = rows < GROUP * query_len
    head = kv_head * GROUP + rows // query_len
    pos = rows % query_len
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q_mask = row_ok[:, None] & dim_ok[None, :]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- global keys (init + retrieved, at position 0) against the queries rotated to the memory distance
    q_mem = tl.load(QM + batch * s_qm_b + head[:, None] * s_qm_h + pos[:, None] * s_qm_l + dims[None, :],
                    mask=q_mask)  # fmt: skip
    acc, m_i, l_i = attend_key_range(
        acc, m_i, l_i, q_mem, KG + batch * s_kg_b + kv_head * s_kg_h, VG + batch * s_vg_b + kv_head * s_vg_h,
        s_kg_n, s_vg_n, 0, num_global, pos, dims, dim_ok, 0, scale_log2,
        CAUSAL=False, BLOCK_N=BLOCK_N, IEEE_FP32=IEEE_FP32,
    )  # fmt: skip

    # -- local keys: the window (seen by every query), then the chunk's own keys (causal)
    q_loc = tl.load(QL + batch * s_ql_b + head[:, None] * s_ql_h + pos[:, None] * s_ql_l + dims[None, :],
                    mask=q_mask)  # fmt: skip
    k_local = KL + batch * s_kl_b + kv_head * s_kl_h
    v_local = VL + batch * s_vl_b + kv_head * s_vl_h
    acc, m_i, l_i = attend_key_range(
        acc, m_i, l_i, q_loc, k_local, v_local, s_kl_n, s_vl_n, 0, window_len,
        pos, dims, dim_ok, 0, scale_log2, CAUSAL=False, BLOCK_N=BLOCK_N, IEEE_FP32=IEEE_FP32,
    )  # fmt: skip
    # keys past the block's last query position are masked for every row: stop the loop there
    last_pos = tl.max(tl.where(row_ok, pos, 0), 0)
    chunk_stop = tl.minimum(num_local, window_len + last_pos + 1)
    acc, m_i, l_i = attend_key_range(
        acc, m_i, l_i, q_loc, k_local, v_local, s_kl_n, s_vl_n, window_len, chunk_stop,
        pos, dims, dim_ok, window_len + 1, scale_log2, CAUSAL=True, BLOCK_N=BLOCK_N, IEEE_FP32=IEEE_FP32,
    )  # fmt: skip

    # -- epilogue: normalise, store the output and the natural-log lse
    out = acc / l_i[:, None]
    tl.store(OUT + batch * s_o_b + head[:, None] * s_o_h + pos[:, None] * s_o_l + dims[None, :],
             out.to(OUT.dtype.element_ty), mask=q_mask)  # fmt: skip
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(LSE + (batch * num_kv_heads * GROUP + head) * query_len + pos, lse, mask=row_ok)
