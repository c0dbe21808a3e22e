import torch
import triton
import triton.language as tl
from nsa.kernels.compressed import band_bounds

@triton.jit
def band_dkdv_t_kernel(
    Q, K, V, DO, LSE, DELTA,
    DK, DV,                   # outputs (C, B, R, H, Dqk), (C, B, R, H, Dv): one slice per query chunk
    scale_log2, scale, seq_len_q, seq_len_k, num_rows,
    lo_back, hi_base, hi_offset, hi_div,
    chunk_len,                # query positions per chunk (a multiple of BLOCK_M)
    HEADS_Q: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # -- this program: BLOCK_N key rows of kv head `head_kv`, held for the whole loop, against
    #    the query positions of chunk `chunk` --
    BLOCK_R: tl.constexpr = BLOCK_M * GROUP_PAD
    pid_n, chunk, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads_kv = HEADS_Q // GROUP
    batch, head_kv = pid_bh // heads_kv, pid_bh % heads_kv
    key = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_rows = batch.to(tl.int64) * num_rows * heads_kv + head_kv + key.to(tl.int64) * heads_kv
    key_ok = key < num_rows
    k = tl.load(K + kv_rows[:, None] * DIM_QK + offs_dqk[None, :],
                mask=key_ok[:, None] & (offs_dqk[None, :] < DIM_QK), other=0.0)
    v = tl.load(V + kv_rows[:, None] * DIM_V + offs_dv[None, :],
                mask=key_ok[:, None] & (offs_dv[None, :] < DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # -- the positions that see a row of this tile (hi(t) > first row and lo(t) <= last row),
    #    cut to this program's chunk --
    first_row = pid_n * BLOCK_N
    last_row = tl.minimum(first_row + BLOCK_N, num_rows) - 1
    offset = seq_len_k - seq_len_q
    t_first = tl.where(first_row < hi_base, 0, (first_row - hi_base + 1) * hi_div - hi_offset)
    t_last = last_row + lo_back
    i_start = tl.maximum(tl.maximum(t_first - offset, 0) // BLOCK_M * BLOCK_M, chunk * chunk_len)
    i_end = tl.minimum(tl.minimum(t_last - offset + 1, seq_len_q), chunk * chunk_len + chunk_len)

    rows = tl.arange(0, BLOCK_R)
    g = rows % GROUP_PAD
    for start_m in range(i_start, i_end, BLOCK_M):
        i = start_m + rows // GROUP_PAD
        row_ok = (i < seq_len_q) & (g < GROUP)
        lo, hi = band_bounds(offset + i, num_rows, lo_back, hi_base, hi_offset, hi_div)
        q_rows = (batch * seq_len_q + i).to(tl.int64) * HEADS_Q + head_kv * GROUP + g
        q = tl.load(Q + q_rows[:, None] * DIM_QK + offs_dqk[None, :],
                    mask=row_ok[:, None] & (offs_dqk[None, :] < DIM_QK), other=0.0)
        do = tl.load(DO + q_rows[:, None] * DIM_V + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < DIM_V), other=0.0)
        lse2 = tl.load(LSE + q_rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + q_rows, mask=row_ok, other=0.0)
        # -- P^T and dS^T of these rows against the tile's keys: (BLOCK_N, BLOCK_R) --
        s_t = tl.dot(k, tl.trans(q)) * scale_log2
        visible = (key[:, None] >= lo[None, :]) & (key[:, None] < hi[None, :]) & row_ok[None, :]
        p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        # -- dV += P^T dO, dK += dS^T Q --
        dv += tl.dot(p_t.to(do.dtype), do)
        dk += tl.dot(ds_t.to(q.dtype), q)
    out_rows = kv_rows + chunk.to(tl.int64) * tl.num_programs(2) * num_rows   # this chunk's slice
    tl.store(DK + out_rows[:, None] * DIM_QK + offs_dqk[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dqk[None, :] < DIM_QK))
    tl.store(DV + out_rows[:, None] * DIM_V + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dv[None, :] < DIM_V))


