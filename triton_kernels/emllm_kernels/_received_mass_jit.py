"""The jitted received-mass kernel (imported on first launch; see backend.py for why).

One program = BLOCK_N local keys of one (batch, KV head); it walks the G*L folded query rows of that group
and sums each key's attention probability exp(s - lse). Partial sums per KV head are added up in torch,
which keeps the result deterministic (no atomics).
"""

import triton
import triton.language as tl

from ._episodic_attention_jit import LOG2E_K, dot


@triton.jit(do_not_specialize=["query_len", "num_local", "window_len"])  # lengths change every chunk
def received_mass_kernel(
    QL, KL, LSE, MASS,
    s_ql_b, s_ql_h, s_ql_l, s_kl_b, s_kl_h, s_kl_n,
    num_kv_heads, query_len, num_local, window_len, head_dim, scale_log2,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_local
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    k_t = tl.load(KL + batch * s_kl_b + kv_head * s_kl_h + cols[None, :] * s_kl_n + dims[:, None],
                  mask=dim_ok[:, None] & col_ok[None, :])  # fmt: skip
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in range(0, GROUP * query_len, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < GROUP * query_len
        head = kv_head * GROUP + rows // query_len
        pos = rows % query_len
        q = tl.load(QL + batch * s_ql_b + head[:, None] * s_ql_h + pos[:, None] * s_ql_l + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :])  # fmt: skip
        # padded rows get lse = +inf: probability 0
        lse = tl.load(LSE + (batch * num_kv_heads * GROUP + head) * query_len + pos, mask=row_ok,
                      other=float("inf"))  # fmt: skip
        s = dot(q, k_t, IEEE_FP32) * scale_log2 - lse[:, None] * LOG2E_K
        # a chunk key is seen only by the queries at or after it (window keys by all)
        visible = row_ok[:, None] & col_ok[None, :] & (cols[None, :] < window_len + pos[:, None] + 1)
        total += tl.sum(tl.where(visible, tl.exp2(s), 0.0), 0)
    tl.store(MASS + pid_bh * num_local + cols, total, mask=col_ok)
