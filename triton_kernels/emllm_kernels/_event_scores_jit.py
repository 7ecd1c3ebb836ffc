"""The jitted event-scoring kernel (imported on first launch; see backend.py for why).

One program = BLOCK_E events: for each KV head it sums that group's query heads into one vector and
takes its dot product with the events' representative slice. A memory-bound GEMV: plain loads and sums.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_events"])  # grows with every evicted event
def event_scores_kernel(
    REPRS, QUERY, SCORES, s_r_e, s_q_h, num_events, num_kv_heads, head_dim,
    GROUP: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    events = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    event_ok = events < num_events
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    scores = tl.zeros([BLOCK_E], dtype=tl.float32)
    for kv_head in range(num_kv_heads):
        # -- the group's query: its query heads summed
        query = tl.zeros([BLOCK_D], dtype=tl.float32)
        for g in range(GROUP):
            query += tl.load(QUERY + (kv_head * GROUP + g) * s_q_h + dims, mask=dim_ok).to(tl.float32)
        reprs = tl.load(REPRS + events[:, None] * s_r_e + kv_head * head_dim + dims[None, :],
                        mask=event_ok[:, None] & dim_ok[None, :])  # fmt: skip
        scores += tl.sum(reprs.to(tl.float32) * query[None, :], 1)
    tl.store(SCORES + events, scores, mask=event_ok)
