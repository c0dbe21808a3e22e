"""A naive, per-query, float64 reference of the whole of Native Sparse Attention.

Written straight from the conventions in DESIGN.md and the team brief, independently of the
chapters' vectorised code (it imports nothing from `nsa`): Python loops over batch, query and
head; every rule is spelled out where it applies. Slow on purpose; use small sizes.

    o, parts = naive_nsa(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config, scale, mem_kv_len)

takes the backends' arguments (`config` is anything with NSAConfig's fields) and returns the
combined output `o: (B, Nq, Hq, Dv)` in float64, and `parts`, a dict of the intermediate results
per branch (for tests that check one branch at a time):

    o_cmp, o_slc, o_win : (B, Nq, Hq, Dv)
    lse_cmp             : (B, Nq, Hq)             compressed branch's log-sum-exp (memory included)
    p_cmp               : (B, Nq, Hq, Nc)         probabilities of the real compressed blocks
    scores              : (B, Nq, H, n_sel)       Eq. 9 importance summed over the group, -inf where
                                                  a block may not be selected
    selected            : list [b][i][kv_head] -> sorted list of selected block indices
"""

import torch

NEG_INF = float("-inf")


def _attend(q_vec, keys, values, positions, scale):
    """Softmax attention of one query vector over the keys at `positions` (float64).

    Returns (output (Dv,), lse float); no position -> (zeros, -inf)."""
    if not positions:
        return torch.zeros(values.shape[-1], dtype=torch.float64), NEG_INF
    index = torch.tensor(positions)
    logits = keys.index_select(0, index) @ q_vec * scale    # (len(positions),)
    lse = torch.logsumexp(logits, dim=0)
    probs = torch.exp(logits - lse)
    return probs @ values[index], float(lse)


def overlap(cmp_block: int, sel_block: int, block_size: int, stride: int, select_block_size: int) -> int:
    """Tokens shared by compressed block i = [i*d, i*d + l) and selection block j = [j*l', (j+1)*l')."""
    lo = max(cmp_block * stride, sel_block * select_block_size)
    hi = min(cmp_block * stride + block_size, (sel_block + 1) * select_block_size)
    return max(0, hi - lo)


def naive_nsa(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config, scale=None, mem_kv_len=0):
    l, d = config.compress_block_size, config.compress_stride
    l_sel, n = config.select_block_size, config.num_selected_blocks
    n_init, n_local = config.num_initial_blocks, config.num_local_blocks
    w, causal = config.window_size, config.causal

    q, k, v, k_cmp, v_cmp = (x.detach().double() for x in (q, k, v, k_cmp, v_cmp))
    # per (batch, kv head) contiguous (N, D) tables, so that each query's gathers are cheap
    k, v, k_cmp, v_cmp = (x.transpose(1, 2).contiguous() for x in (k, v, k_cmp, v_cmp))
    g_cmp, g_slc, g_win = (g.detach().double() for g in (g_cmp, g_slc, g_win))
    B, Nq, Hq, Dqk = q.shape
    H, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // H
    if scale is None:
        scale = Dqk ** -0.5

    num_cmp = (Nk - l) // d + 1 if Nk >= l else 0          # real compressed blocks
    assert k_cmp.shape[2] == mem_kv_len + num_cmp, (k_cmp.shape, mem_kv_len, num_cmp)
    num_sel = -(-Nk // l_sel)                              # ceil(Nk / l')
    overlapping = [[c for c in range(num_cmp) if overlap(c, j, l, d, l_sel) > 0] for j in range(num_sel)]

    o_cmp = torch.zeros(B, Nq, Hq, Dv, dtype=torch.float64)
    o_slc = torch.zeros_like(o_cmp)
    o_win = torch.zeros_like(o_cmp)
    lse_cmp = torch.full((B, Nq, Hq), NEG_INF, dtype=torch.float64)
    p_cmp = torch.zeros(B, Nq, Hq, num_cmp, dtype=torch.float64)
    scores = torch.full((B, Nq, H, num_sel), NEG_INF, dtype=torch.float64)
    selected = [[[None] * H for _ in range(Nq)] for _ in range(B)]

    for b in range(B):
        for i in range(Nq):
            t = Nk - Nq + i                                 # queries aligned to the end
            own_block = t // l_sel

            # ---- compressed branch (per query head) ----
            for h in range(Hq):
                hk = h // G
                visible = list(range(mem_kv_len))           # memory tokens: always visible
                for c in range(num_cmp):
                    last_key = c * d + l - 1
                    if (not causal) or last_key <= t:
                        visible.append(mem_kv_len + c)
                out, lse = _attend(q[b, i, h], k_cmp[b, hk], v_cmp[b, hk], visible, scale)
                o_cmp[b, i, h] = out
                lse_cmp[b, i, h] = lse
                real = [pos for pos in visible if pos >= mem_kv_len]
                if real:                                    # p_cmp = exp(s - lse), real blocks only
                    logits = k_cmp[b, hk, real] @ q[b, i, h] * scale
                    p_cmp[b, i, h, [pos - mem_kv_len for pos in real]] = torch.exp(logits - lse)

            # ---- selection (per kv head, importance summed over its query heads) ----
            for hk in range(H):
                candidates = [j for j in range(num_sel) if (not causal) or j <= own_block]
                group_p = [p_cmp[b, i, h].tolist() for h in range(hk * G, (hk + 1) * G)]
                for j in candidates:
                    total = 0.0
                    for p_head in group_p:
                        for c in overlapping[j]:
                            total += overlap(c, j, l, d, l_sel) / d * p_head[c]
                    scores[b, i, hk, j] = total
                forced = [j for j in range(n_init) if j in candidates]
                forced += [j for j in range(own_block - n_local + 1, own_block + 1)
                           if j >= 0 and j in candidates and j not in forced]
                chosen = list(forced)
                # the rest by score, highest first; ties to the lower block index
                rest = sorted((j for j in candidates if j not in forced),
                              key=lambda j: (-float(scores[b, i, hk, j]), j))
                for j in rest:
                    if len(chosen) >= n:
                        break
                    chosen.append(j)
                chosen = sorted(chosen[:n])
                selected[b][i][hk] = chosen

            # ---- selected and sliding-window branches (per query head) ----
            for h in range(Hq):
                hk = h // G
                keys = []
                for j in selected[b][i][hk]:
                    for s in range(j * l_sel, min((j + 1) * l_sel, Nk)):
                        if (not causal) or s <= t:
                            keys.append(s)
                o_slc[b, i, h] = _attend(q[b, i, h], k[b, hk], v[b, hk], keys, scale)[0]
                if causal:
                    window = [s for s in range(max(0, t - w + 1), t + 1) if t - w < s <= t]
                else:
                    window = [s for s in range(max(0, t - w + 1), min(Nk, t + w)) if t - w < s < t + w]
                o_win[b, i, h] = _attend(q[b, i, h], k[b, hk], v[b, hk], window, scale)[0]

    o = g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_win[..., None] * o_win
    parts = dict(o_cmp=o_cmp, o_slc=o_slc, o_win=o_win, lse_cmp=lse_cmp, p_cmp=p_cmp,
                 scores=scores, selected=selected)
    return o, parts
