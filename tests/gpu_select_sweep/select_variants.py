import triton
import triton.language as tl


@triton.jit
def rank_keys(score, index):
    """One int64 per (score, block index) that orders as the selection does: a higher score
    first, then a lower block index. A float's bits order as integers once the magnitude bits of
    negative floats are flipped; the low 32 bits hold 2^31 - 1 - index."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - index).to(tl.int64)


@triton.jit
def select_blocks_kernel(
    Q, K_CMP,            # (B, Nq, Hq, Dqk), (B, mem + N_c, H, Dqk): the real compressed rows start at mem
    LSE,                 # (B, Nq, Hq) float32: the compressed branch's lse (memory included)
    BLOCK_INDICES,       # output (B, Nq, H, n) int32: ascending, -1 (empty) last
    scale_log2, seq_len_q, seq_len_k,
    mem_kv_len, num_cmp, num_sel,   # memory rows, real compressed blocks N_c, selection blocks ceil(Nk/l')
    HEADS_Q: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,   # l, d, l'
    NUM_SELECT: tl.constexpr, SLOTS: tl.constexpr,   # n, and n padded to a power of two
    NUM_INITIAL: tl.constexpr, NUM_LOCAL: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,   # query positions per program (>= 16: the rows of the Eq. 9 dot)
    BLOCK_S: tl.constexpr,   # selection blocks per step (>= 16)
    MODE: tl.constexpr = 0,
):
    BLOCK_R: tl.constexpr = BLOCK_M * GROUP_PAD
    BLOCK_C: tl.constexpr = BLOCK_S * SEL_BLOCK // CMP_STRIDE     # compressed blocks per step
    EMPTY: tl.constexpr = -(1 << 62)    # below every rank key of a score >= 0: an empty slot
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)           # longest rows first
    batch, head_kv = tl.program_id(1), tl.program_id(2)
    heads_kv = HEADS_Q // GROUP

    # -- the rows: BLOCK_M positions x the group's heads, as in the attention kernels --
    rows = tl.arange(0, BLOCK_R)
    i_row = pid_m * BLOCK_M + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_ok = (i_row < seq_len_q) & (g < GROUP)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    q_rows = (batch * seq_len_q + i_row).to(tl.int64) * HEADS_Q + head_kv * GROUP + g
    q = tl.load(Q + q_rows[:, None] * DIM_QK + offs_dqk[None, :],
                mask=row_ok[:, None] & (offs_dqk[None, :] < DIM_QK), other=0.0)
    lse2 = tl.load(LSE + q_rows, mask=row_ok, other=0.0) * 1.4426950408889634
    if CAUSAL:   # the real compressed blocks each row sees: c*d + l - 1 <= t
        pos_row = seq_len_k - seq_len_q + i_row
        cmp_end = tl.minimum(tl.maximum(pos_row - CMP_BLOCK + 1 + CMP_STRIDE, 0) // CMP_STRIDE, num_cmp)
    else:
        cmp_end = tl.zeros([BLOCK_R], dtype=tl.int32) + num_cmp

    # -- the positions once each: the rows of the scores --
    i_pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    own = (seq_len_k - seq_len_q + i_pos) // SEL_BLOCK              # each query's own block
    if CAUSAL:
        last_pos = seq_len_k - seq_len_q + tl.minimum(pid_m * BLOCK_M + BLOCK_M, seq_len_q) - 1
        last_sel = last_pos // SEL_BLOCK
    else:
        last_sel = num_sel - 1

    # -- Eq. 9's weights for a step, W[c, j] = |B_c ∩ B_j| / d, and the part carried to the next --
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    cmp_lo = offs_c[:, None] * CMP_STRIDE                       # token offsets within the step
    sel_lo = offs_s[None, :] * SEL_BLOCK
    w_this = tl.maximum(tl.minimum(cmp_lo + CMP_BLOCK, sel_lo + SEL_BLOCK) - tl.maximum(cmp_lo, sel_lo), 0)
    sel_lo_next = sel_lo + BLOCK_S * SEL_BLOCK
    w_next = tl.maximum(tl.minimum(cmp_lo + CMP_BLOCK, sel_lo_next + SEL_BLOCK) - tl.maximum(cmp_lo, sel_lo_next), 0)
    w_this = (w_this // CMP_STRIDE).to(tl.float32)              # (BLOCK_C, BLOCK_S)
    w_next = (w_next // CMP_STRIDE).to(tl.float32)

    # -- the running top-n per position, as rank keys: empty slots distinct and lowest, the
    #    padding slots (n < SLOTS) highest, so that they are never the worst kept --
    slot = tl.arange(0, SLOTS)
    top = tl.zeros([BLOCK_M, SLOTS], dtype=tl.int64) + tl.where(slot < NUM_SELECT, EMPTY - slot.to(tl.int64),
                                                                9223372036854775807)[None, :]
    carry = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    if MODE == 1 or MODE >= 4:
        top = tl.sort(top, dim=1)
    offs_u = tl.arange(0, SEL_BLOCK // CMP_STRIDE) * CMP_STRIDE
    w_home = ((tl.minimum(offs_u + CMP_BLOCK, SEL_BLOCK) - offs_u) // CMP_STRIDE).to(tl.float32)
    w_spill = (tl.maximum(offs_u + CMP_BLOCK - SEL_BLOCK, 0) // CMP_STRIDE).to(tl.float32)
    shift = tl.where(offs_s[:, None] + 1 == offs_s[None, :], 1.0, 0.0)
    carry1 = tl.zeros([BLOCK_M], dtype=tl.float32)

    k_base = batch.to(tl.int64) * (mem_kv_len + num_cmp) * heads_kv + head_kv
    for sel_start in range(0, last_sel + 1, BLOCK_S):
        # -- 1. probabilities of this step's compressed blocks (pass 2: lse known) --
        cmp = sel_start * (SEL_BLOCK // CMP_STRIDE) + offs_c                      # (BLOCK_C,)
        k_rows = k_base + (mem_kv_len + cmp).to(tl.int64) * heads_kv
        k = tl.load(K_CMP + k_rows[:, None] * DIM_QK + offs_dqk[None, :],
                    mask=(cmp[:, None] < num_cmp) & (offs_dqk[None, :] < DIM_QK), other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2                                   # (BLOCK_R, BLOCK_C)
        visible = (cmp[None, :] < cmp_end[:, None]) & row_ok[:, None]
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        # -- 2. sum over the group; 3. Eq. 9 as a product with the overlap weights --
        p_group = tl.sum(tl.reshape(p, (BLOCK_M, GROUP_PAD, BLOCK_C)), axis=1)    # (BLOCK_M, BLOCK_C)
        # (tf32x3: three tf32 products, about float32's precision, so that near-ties rank as in
        # the float32 reference; the weights are small integers, exact in any format)
        if MODE == 3:
            score = tl.sum(tl.reshape(p_group, (BLOCK_M, BLOCK_S, BLOCK_C // BLOCK_S)), axis=2)
        elif MODE >= 4:
            p3 = tl.reshape(p_group, (BLOCK_M, BLOCK_S, SEL_BLOCK // CMP_STRIDE))
            home = tl.sum(p3 * w_home[None, None, :], axis=2)                   # (BLOCK_M, BLOCK_S)
            spill = tl.sum(p3 * w_spill[None, None, :], axis=2)
            shifted = tl.sum(spill[:, :, None] * shift[None, :, :], axis=1)
            score = home + shifted + tl.where(offs_s == 0, 1.0, 0.0)[None, :] * carry1[:, None]
            carry1 = tl.sum(tl.where(offs_s == BLOCK_S - 1, 1.0, 0.0)[None, :] * spill, axis=1)
        else:
            score = carry + tl.dot(p_group, w_this, input_precision="tf32x3")
            carry = tl.dot(p_group, w_next, input_precision="tf32x3")
        # -- 4. blocks a query may not take: never enter; blocks it must take: +inf --
        sel = sel_start + offs_s
        if CAUSAL:
            allowed = (sel[None, :] <= own[:, None]) & (sel[None, :] < num_sel)
        else:
            allowed = (sel[None, :] < num_sel) & (own[:, None] >= 0)
        forced = allowed & ((sel[None, :] < NUM_INITIAL)
                            | ((sel[None, :] > own[:, None] - NUM_LOCAL) & (sel[None, :] <= own[:, None])))
        cand = rank_keys(tl.where(forced, float("inf"), score), sel[None, :] + tl.zeros_like(own)[:, None])
        cand = tl.where(allowed, cand, EMPTY - SLOTS)                              # (BLOCK_M, BLOCK_S)
        # -- 5. merge --
        if MODE == 0:
            best = tl.max(cand, axis=1)
            worst = tl.min(top, axis=1)
            enters = best > worst
            while tl.max(enters.to(tl.int32), axis=0) > 0:
                top = tl.where(enters[:, None] & (top == worst[:, None]), best[:, None], top)
                cand = tl.where(enters[:, None] & (cand == best[:, None]), EMPTY - SLOTS, cand)
                best = tl.max(cand, axis=1)
                worst = tl.min(top, axis=1)
                enters = best > worst
        elif MODE == 1 or MODE == 4:
            top = tl.sort(tl.maximum(top, tl.sort(cand, dim=1, descending=True)), dim=1)
        elif MODE == 5:
            if tl.max(tl.max(cand, axis=1) - tl.min(top, axis=1), axis=0) > 0:
                top = tl.sort(tl.maximum(top, tl.sort(cand, dim=1, descending=True)), dim=1)
            top = tl.sort(tl.maximum(top, tl.sort(cand, dim=1, descending=True)), dim=1)
        else:
            top = tl.maximum(top, cand)

    # -- the chosen blocks (low 32 bits) in ascending order, empty slots (-1) last --
    index = 2147483647 - (top & 0xFFFFFFFF).to(tl.int32)
    order = tl.sort(tl.where((top > EMPTY) & (slot[None, :] < NUM_SELECT), index, 2147483647), dim=1)
    chosen = tl.where(order == 2147483647, -1, order)
    out_rows = (batch * seq_len_q + i_pos).to(tl.int64) * heads_kv + head_kv
    tl.store(BLOCK_INDICES + out_rows[:, None] * NUM_SELECT + slot[None, :], chosen,
             mask=(i_pos[:, None] < seq_len_q) & (slot[None, :] < NUM_SELECT))


