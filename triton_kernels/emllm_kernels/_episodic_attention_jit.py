"""The jitted episodic attention forward (imported on first launch; see backend.py for why).

One program = BLOCK_M folded query rows of one (batch, KV head) over one split of the keys: rows
r = g * L + i for the G query heads sharing that KV head, so K/V are read once per group and never repeated.
Online softmax in base 2. The keys, global then local, are cut into `keys_per_split` runs (split-KV): a
decoded token has one block of rows per KV head, too few programs to fill a GPU, so each split writes its
own normalised partial (in the output dtype) and fp32 lse, and the launcher merges them. With one split
the partial is the output.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # for the launchers, which scale the softmax scale into base 2
# a compiled kernel may read a global only when it is a tl.constexpr (the interpreter reads any)
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(0.6931471805599453)


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


@triton.jit
def load_rows(base, stride_h, stride_l, head, pos, dims, mask):
    """The (BLOCK_M, BLOCK_D) tile of folded rows (head, pos) from a (H, L, D) tensor at `base`."""
    return tl.load(base + head[:, None] * stride_h + pos[:, None] * stride_l + dims[None, :], mask=mask)


# lengths change with every chunk: specialising on them (==1, divisible by 16) would recompile mid-stream
VARYING = ["query_len", "num_global", "num_local", "window_len", "keys_per_split", "s_lse_split"]


@triton.jit(do_not_specialize=VARYING)
def episodic_attention_kernel(
    QM, QL, KG, VG, KL, VL, OUT, LSE,
    s_qm_b, s_qm_h, s_qm_l, s_ql_b, s_ql_h, s_ql_l,
    s_kg_b, s_kg_h, s_kg_n, s_vg_b, s_vg_h, s_vg_n,
    s_kl_b, s_kl_h, s_kl_n, s_vl_b, s_vl_h, s_vl_n,
    s_o_split, s_o_b, s_o_h, s_o_l, s_lse_split,
    num_kv_heads, query_len, num_global, num_local, window_len, keys_per_split, head_dim, scale_log2,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    batch = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # folded rows g * L + i
    row_ok = rows < GROUP * query_len
    head = kv_head * GROUP + rows // query_len
    pos = rows % query_len
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q_mask = row_ok[:, None] & dim_ok[None, :]
    # this split's keys: [lo, hi) of the global keys followed by the local ones
    lo = split * keys_per_split
    hi = lo + keys_per_split

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- global keys (init + retrieved, at position 0) against the queries rotated to the memory distance
    global_start = tl.minimum(lo, num_global)
    global_stop = tl.minimum(hi, num_global)
    if global_start < global_stop:
        q_mem = load_rows(QM + batch * s_qm_b, s_qm_h, s_qm_l, head, pos, dims, q_mask)
        k_global, v_global = KG + batch * s_kg_b + kv_head * s_kg_h, VG + batch * s_vg_b + kv_head * s_vg_h
        acc, m_i, l_i = attend_key_range(
            acc, m_i, l_i, q_mem, k_global, v_global, s_kg_n, s_vg_n, global_start, global_stop,
            pos, dims, dim_ok, 0, scale_log2, CAUSAL=False, BLOCK_N=BLOCK_N, IEEE_FP32=IEEE_FP32,
        )  # fmt: skip

    # -- local keys: the window (seen by every query), then the chunk's own keys (causal)
    local_start = tl.maximum(lo - num_global, 0)
    # keys past the block's last query position are masked for every row: stop there
    last_pos = tl.max(tl.where(row_ok, pos, 0), 0)
    local_stop = tl.minimum(tl.maximum(hi - num_global, 0), tl.minimum(num_local, window_len + last_pos + 1))
    window_stop = tl.minimum(local_stop, window_len)
    chunk_start = tl.maximum(local_start, window_len)
    if local_start < local_stop:
        q_loc = load_rows(QL + batch * s_ql_b, s_ql_h, s_ql_l, head, pos, dims, q_mask)
        k_local, v_local = KL + batch * s_kl_b + kv_head * s_kl_h, VL + batch * s_vl_b + kv_head * s_vl_h
        acc, m_i, l_i = attend_key_range(
            acc, m_i, l_i, q_loc, k_local, v_local, s_kl_n, s_vl_n, local_start, window_stop,
            pos, dims, dim_ok, 0, scale_log2, CAUSAL=False, BLOCK_N=BLOCK_N, IEEE_FP32=IEEE_FP32,
        )  # fmt: skip
        acc, m_i, l_i = attend_key_range(
            acc, m_i, l_i, q_loc, k_local, v_local, s_kl_n, s_vl_n, chunk_start, local_stop,
            pos, dims, dim_ok, window_len + 1, scale_log2, CAUSAL=True, BLOCK_N=BLOCK_N, IEEE_FP32=IEEE_FP32,
        )  # fmt: skip

    # -- epilogue: normalise, store the output and the natural-log lse; a split no row sees gives 0 and -inf
    seen = l_i > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    out_rows = OUT + split * s_o_split + batch * s_o_b + head[:, None] * s_o_h + pos[:, None] * s_o_l
    tl.store(out_rows + dims[None, :], out.to(OUT.dtype.element_ty), mask=q_mask)
    lse = tl.where(seen, (m_i + tl.log2(l_i)) * LN2_K, float("-inf"))
    lse_base = LSE + split * s_lse_split + batch * num_kv_heads * GROUP * query_len
    tl.store(lse_base + head * query_len + pos, lse, mask=row_ok)
