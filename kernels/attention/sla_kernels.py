"""Triton kernels of sparse-linear attention (the math, layouts and API: turbo_kernels.attention.sla).

Sparse branch: `_sla_fwd_kernel` (online softmax over each query block's critical key blocks, optionally
the linear branch in its epilogue), `_sla_bwd_preprocess`, `_sla_bwd_dq_kernel` (query-major table) and
`_sla_bwd_dkdv_kernel` (key-major inverted table). Linear branch: `_sla_lin_state_kernel` (per key block
h_j, z_j), the per-tile functions `_lin_fwd_tile`, `_lin_bwd_q_tile`, `_lin_bwd_kv_tile` and their
standalone kernels `_sla_lin_fwd_kernel`, `_sla_lin_bwd_q_kernel`, `_sla_lin_bwd_kv_kernel`. The host
launchers and the autograd Functions live in sla.py; this module holds device code only.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    from turbo_kernels.attention.lowbit import lazy_running_max  # the low-bit kernels' lazy-rescale rule
except ImportError:  # CPU-only install: sla.py uses the torch reference
    triton = None

if triton is not None:

    @triton.jit
    def _load2d(ptrs, row_ok, col_ok, ROWS: tl.constexpr, COLS: tl.constexpr):
        # Load a 2-D tile, masking rows and/or columns only where the shapes need it.
        if ROWS and COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        elif ROWS:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        elif COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _phi(x, mask_d, FEATURE: tl.constexpr):
        # phi over the head dim of an fp32 tile (rows, BLOCK_D); padded columns come out 0.
        # FEATURE: 0 softmax, 1 elu+1, 2 relu.
        if FEATURE == 0:
            x = tl.where(mask_d[None, :], x, float("-inf"))
            e = tl.exp(x - tl.max(x, axis=1)[:, None])
            y = e / tl.sum(e, axis=1)[:, None]
        elif FEATURE == 1:
            y = tl.where(x > 0, x + 1.0, tl.exp(x))
            y = tl.where(mask_d[None, :], y, 0.0)
        else:
            y = tl.maximum(x, 0.0)
        return y

    @triton.jit
    def _phi_bwd(x, y, dy, mask_d, FEATURE: tl.constexpr):
        # d phi^T: softmax y (dy - <dy, y>); elu+1 dy * (x > 0 ? 1 : y); relu dy * (x > 0).
        if FEATURE == 0:
            dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
        elif FEATURE == 1:
            dx = tl.where(mask_d[None, :], dy * tl.where(x > 0, 1.0, y), 0.0)
        else:
            dx = tl.where(x > 0, dy, 0.0)
        return dx

    @triton.jit
    def _lin_state_block(K, V, wt, HS, ZS, b, h, pid_bh, j, skb, skh, skl, svb, svh, svl, Lk, D, num_kb, inv_lk,
                         offs_d, mask_d, MAP_BK: tl.constexpr, FEATURE: tl.constexpr, FOLD_W: tl.constexpr):
        # Key block j of one (batch, head): h_j = phi(K_j)^T V_j / Lk  (D x D, fp32 accumulate) and
        # z_j = phi(K_j)^T 1 / Lk (D). Rows past Lk are zeroed after phi; a block past the last (j >= num_kb, the
        # tail of a multi-block program) loads nothing and stores nothing. Stored in the GEMM operand dtype (that
        # of V): HS (BH, Nk, D, D), ZS (BH, Nk, D). FOLD_W (inference): h_j W^T = phi(K_j)^T (V_j W^T), proj_l
        # folded in here on the V tile (wt: W^T, D x D, V's dtype) instead of a GEMM pass over the (Nq, D, D)
        # marginal sums afterwards.
        offs_n = j * MAP_BK + tl.arange(0, MAP_BK)
        mask = (offs_n[:, None] < Lk) & mask_d[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=mask, other=0.0)
        fk = _phi(k.to(tl.float32), mask_d, FEATURE) * inv_lk
        fk = tl.where(offs_n[:, None] < Lk, fk, 0.0)
        if FOLD_W:
            v = tl.dot(v, wt).to(wt.dtype)  # (MAP_BK, BLOCK_D): V_j W^T
        hj = tl.dot(tl.trans(fk.to(v.dtype)), v)  # (BLOCK_D, BLOCK_D)
        zj = tl.sum(fk, axis=0)
        base = pid_bh.to(tl.int64) * num_kb + j
        ok = mask_d & ((offs_d * 0 + j) < num_kb)  # a vector: the interpreter refuses a scalar in a mask
        tl.store(HS + base * D * D + offs_d[:, None] * D + offs_d[None, :], hj.to(HS.dtype.element_ty),
                 mask=ok[:, None] & mask_d[None, :])
        tl.store(ZS + base * D + offs_d, zj.to(ZS.dtype.element_ty), mask=ok)

    @triton.jit
    def _sla_lin_state_kernel(K, V, WT, HS, ZS, skb, skh, skl, svb, svh, svl, H, Lk, D, num_kb, inv_lk,
                              MAP_BK: tl.constexpr, BLOCK_D: tl.constexpr, FEATURE: tl.constexpr,
                              FOLD_W: tl.constexpr, BLOCKS: tl.constexpr):
        # BLOCKS consecutive key blocks of one (batch, head) per program (`_lin_state_block`): W^T is loaded once,
        # and with BLOCKS > 1 the blocks run as a pipelined loop (the next block's K and V are fetched while this
        # one's products run).
        pid_j = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if FOLD_W:
            wt = tl.load(WT + offs_d[:, None] * D + offs_d[None, :], mask=mask_d[:, None] & mask_d[None, :],
                         other=0.0)
        else:
            wt = WT
        if BLOCKS == 1:
            _lin_state_block(K, V, wt, HS, ZS, b, h, pid_bh, pid_j, skb, skh, skl, svb, svh, svl, Lk, D, num_kb,
                             inv_lk, offs_d, mask_d, MAP_BK, FEATURE, FOLD_W)
        else:
            for jj in tl.range(0, BLOCKS):
                _lin_state_block(K, V, wt, HS, ZS, b, h, pid_bh, pid_j * BLOCKS + jj, skb, skh, skl, svb, svh, svl,
                                 Lk, D, num_kb, inv_lk, offs_d, mask_d, MAP_BK, FEATURE, FOLD_W)

    @triton.jit
    def _lin_fwd_tile(q, HM, ZM, WT, qblock, D, offs_d, mask_d, lin_eps, FEATURE: tl.constexpr,
                      FOLDED: tl.constexpr, PHI_DONE: tl.constexpr):
        # proj_l(O_l) without bias for one query tile, fp32: with this query block's marginal sums
        # Hm (D x D) and Zm (D), (phi(q) Hm / (eps + phi(q).Zm)) W^T. FOLDED (inference): HM holds Hm W^T
        # (the row scaling by 1/den commutes with the right product): one D x D product and one row sum,
        # no W^T. PHI_DONE: q is phi(q) already (the fused sparse kernel's inference epilogue: phi's exp,
        # row max and row sum were about half of its instructions, tools/kernel_resources.py); the
        # separate epilogue kernel computes phi itself (no extra pass over Q).
        mask_dd = mask_d[:, None] & mask_d[None, :]
        hm = tl.load(HM + qblock * D * D + offs_d[:, None] * D + offs_d[None, :], mask=mask_dd, other=0.0)
        zm = tl.load(ZM + qblock * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if PHI_DONE:
            fq = q.to(tl.float32)
        else:
            fq = _phi(q.to(tl.float32), mask_d, FEATURE)
        o_l = tl.dot(fq.to(hm.dtype), hm) / (tl.sum(fq * zm[None, :], axis=1) + lin_eps)[:, None]
        if FOLDED:
            return o_l
        wt = tl.load(WT + offs_d[:, None] * D + offs_d[None, :], mask=mask_dd, other=0.0)
        return tl.dot(o_l.to(wt.dtype), wt)

    @triton.jit
    def _lin_bwd_q_tile(q, do, HM, ZM, W, DHM, DZM, qblock, tile, D, offs_d, mask_d, lin_eps,
                        FEATURE: tl.constexpr):
        # Linear branch, query side, per row r of block i (Hm_i, Zm_i the marginal sums):
        #   o_l = phi(q) Hm / den, den = eps + phi(q).Zm, dO_l = dO W (proj_l's input gradient)
        #   dnum = dO_l / den, dden = -<dO_l, o_l> / den
        #   dphi(q) = dnum Hm^T + dden Zm^T  ->  dq_lin = phi'(q)^T dphi(q)
        #   dHm_i += phi(q)^T dnum, dZm_i += phi(q)^T dden: this tile's parts, stored at `tile`.
        # Rows past Lq come in as q = dO = 0: dnum = dden = 0 there, so they add nothing.
        # Returns (dq_lin, o_l), fp32; o_l feeds dW = dO^T o_l.
        mask_dd = mask_d[:, None] & mask_d[None, :]
        hm = tl.load(HM + qblock * D * D + offs_d[:, None] * D + offs_d[None, :], mask=mask_dd, other=0.0)
        zm = tl.load(ZM + qblock * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(W + offs_d[:, None] * D + offs_d[None, :], mask=mask_dd, other=0.0)  # (out, in)
        x = q.to(tl.float32)
        fq = _phi(x, mask_d, FEATURE)
        den = tl.sum(fq * zm[None, :], axis=1) + lin_eps
        o_l = tl.dot(fq.to(hm.dtype), hm) / den[:, None]
        do_l = tl.dot(do, w)
        dnum = do_l / den[:, None]
        dden = -tl.sum(do_l * o_l, axis=1) / den
        dfq = tl.dot(dnum.to(hm.dtype), tl.trans(hm)) + dden[:, None] * zm[None, :]
        dhm = tl.dot(tl.trans(fq.to(hm.dtype)), dnum.to(hm.dtype))  # (BLOCK_D, BLOCK_D)
        tl.store(DHM + tile * D * D + offs_d[:, None] * D + offs_d[None, :], dhm.to(DHM.dtype.element_ty), mask=mask_dd)
        tl.store(DZM + tile * D + offs_d, tl.sum(fq * dden[:, None], axis=0).to(DZM.dtype.element_ty), mask=mask_d)
        return _phi_bwd(x, fq, dfq, mask_d, FEATURE), o_l

    @triton.jit
    def _lin_bwd_kv_tile(k, v, DH, DZ, kblock, D, offs_d, mask_d, inv_lk, FEATURE: tl.constexpr):
        # Linear branch, key side, with dh_j, dz_j the gradients of h_j = fk^T V_j, z_j = fk^T 1
        # (fk = phi(K_j) / Lk; summed over the query blocks for which j is marginal by a GEMM):
        #   dV = fk dh_j,  d fk = V dh_j^T + 1 dz_j^T,  dK = phi'(k)^T (d fk / Lk).
        mask_dd = mask_d[:, None] & mask_d[None, :]
        dh = tl.load(DH + kblock * D * D + offs_d[:, None] * D + offs_d[None, :], mask=mask_dd, other=0.0)
        dz = tl.load(DZ + kblock * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        x = k.to(tl.float32)
        y = _phi(x, mask_d, FEATURE)
        dv = tl.dot((y * inv_lk).to(dh.dtype), dh)
        dfk = tl.dot(v, tl.trans(dh)) + dz[None, :]
        return _phi_bwd(x, y, dfk * inv_lk, mask_d, FEATURE), dv

    @triton.jit
    def _sla_lin_fwd_kernel(Q, OS, O, HM, ZM, WT, BIAS, sqb, sqh, sql, sob, soh, sol, H, Lq, D, num_qb, lin_eps,
                            MAP_BQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                            HAS_BIAS: tl.constexpr, FEATURE: tl.constexpr, FOLDED: tl.constexpr):
        # Unfused variant: O = O_s + proj_l(O_l) for one query tile, after the sparse kernel; phi(q) here.
        # OS may be O itself (inference: each program reads its tile before writing it). FOLDED: HM is Hm W^T.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = (offs_m[:, None] < Lq) & mask_d[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=mask, other=0.0)
        o_ptrs = b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :]
        acc = tl.load(OS + o_ptrs, mask=mask, other=0.0).to(tl.float32)
        qblock = pid_bh.to(tl.int64) * num_qb + (pid_m * BLOCK_M) // MAP_BQ
        acc += _lin_fwd_tile(q, HM, ZM, WT, qblock, D, offs_d, mask_d, lin_eps, FEATURE, FOLDED, False)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0)[None, :]
        tl.store(O + o_ptrs, acc.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _sla_lin_bwd_q_kernel(Q, DO, DQ, HM, ZM, W, DHM, DZM, OL, sqb, sqh, sql, sdb, sdh, sdl, sgb, sgh, sgl,
                              H, Lq, D, num_qb, tiles_per_bh, lin_eps,
                              MAP_BQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                              FEATURE: tl.constexpr):
        # Unfused variant: dQ += the linear branch's part, after the sparse dQ kernel.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = (offs_m[:, None] < Lq) & mask_d[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :], mask=mask, other=0.0)
        g_ptrs = b * sgb + h * sgh + offs_m[:, None] * sgl + offs_d[None, :]
        dq = tl.load(DQ + g_ptrs, mask=mask, other=0.0).to(tl.float32)
        qblock = pid_bh.to(tl.int64) * num_qb + (pid_m * BLOCK_M) // MAP_BQ
        dq_lin, o_l = _lin_bwd_q_tile(q, do, HM, ZM, W, DHM, DZM, qblock, pid_bh.to(tl.int64) * tiles_per_bh + pid_m,
                                      D, offs_d, mask_d, lin_eps, FEATURE)
        tl.store(DQ + g_ptrs, (dq + dq_lin).to(DQ.dtype.element_ty), mask=mask)
        tl.store(OL + g_ptrs, o_l.to(OL.dtype.element_ty), mask=mask)

    @triton.jit
    def _sla_lin_bwd_kv_kernel(K, V, DK, DV, DH, DZ, skb, skh, skl, svb, svh, svl, sgb, sgh, sgl,
                               H, Lk, D, num_kb, inv_lk, MAP_BK: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, FEATURE: tl.constexpr):
        # Unfused variant: dK, dV += the linear branch's parts, after the sparse dK/dV kernel.
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = (offs_n[:, None] < Lk) & mask_d[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=mask, other=0.0)
        g_ptrs = b * sgb + h * sgh + offs_n[:, None] * sgl + offs_d[None, :]
        kblock = pid_bh.to(tl.int64) * num_kb + (pid_n * BLOCK_N) // MAP_BK
        dk_lin, dv_lin = _lin_bwd_kv_tile(k, v, DH, DZ, kblock, D, offs_d, mask_d, inv_lk, FEATURE)
        dk = tl.load(DK + g_ptrs, mask=mask, other=0.0).to(tl.float32) + dk_lin
        dv = tl.load(DV + g_ptrs, mask=mask, other=0.0).to(tl.float32) + dv_lin
        tl.store(DK + g_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + g_ptrs, dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwd_step(acc, l_i, m_i, q, k, v, tok_ok, qk_scale, MASK: tl.constexpr, TAU: tl.constexpr):
        # One online-softmax step over a loaded tile of keys k, v (BLOCK_N, BLOCK_D); tok_ok masks its scores
        # when MASK (the pointer kernel's and the descriptor kernel's tiles alike).
        # TAU > 0: lazy rescaling (FlashAttention-4): a row's running max moves only when the tile's max
        # exceeds it by more than TAU (log2 units), so P <= 2^TAU (in range for bf16/fp16), and the
        # accumulator is rescaled only when some row's max moved (alpha is exactly 1 elsewhere). The LSE
        # m + log2(l) stays exact: l is summed against the same stale m.
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) raw scores
        if MASK:
            s = tl.where(tok_ok[None, :], s, float("-inf"))
        # log2(e)/sqrt(d) folded into one multiply-add: p = exp2(s * c - m), m in scaled units.
        # The first tile always holds a valid key (every LUT block has >= 1 token and tiles start
        # at block starts), so m_new is finite from the first step on.
        m_new = lazy_running_max(m_i, tl.maximum(m_i, tl.max(s, axis=1) * qk_scale), TAU)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if TAU > 0:
            if tl.max((m_new != m_i).to(tl.int32), 0) > 0:
                acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, l_i, m_new

    @triton.jit
    def _fwd_tile(acc, l_i, m_i, q, kp, vp, tok_ok, mask_d, qk_scale, MASK: tl.constexpr, PAD_D: tl.constexpr,
                  TAU: tl.constexpr):
        # `_fwd_step` over a tile of keys loaded from pointers kp/vp: (BLOCK_N, BLOCK_D).
        k = _load2d(kp, tok_ok, mask_d, MASK, PAD_D)
        v = _load2d(vp, tok_ok, mask_d, MASK, PAD_D)
        return _fwd_step(acc, l_i, m_i, q, k, v, tok_ok, qk_scale, MASK, TAU)

    @triton.jit
    def _sla_fwd_kernel(Q, K, V, O, OS, LSE, LUT, HM, ZM, WT, BIAS, FQ,
                        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sfb, sfh, sfl,
                        H, Lq, Lk, D, n_sel, num_qb, qk_scale, lin_eps,
                        MAP_BQ: tl.constexpr, MAP_BK: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr,
                        STORE_LSE: tl.constexpr, STORE_OS: tl.constexpr, LINEAR: tl.constexpr,
                        HAS_BIAS: tl.constexpr, FEATURE: tl.constexpr, PAD_D: tl.constexpr,
                        FOLDED: tl.constexpr, TAU: tl.constexpr):
        # One program: BLOCK_M queries (inside one map block of MAP_BQ) of one (batch, head).
        # The selected keys are the concatenation of the n LUT blocks (n * MAP_BK positions).
        # BLOCK_N <= MAP_BK: a tile lies inside one block, its rows are contiguous from a scalar
        #   base, and only the last LUT entry can be the ragged tail block (the LUT is ascending),
        #   so every tile but those of the last entry runs unmasked.
        # BLOCK_N > MAP_BK: a tile gathers BLOCK_N // MAP_BK whole entries (vector LUT load), unmasked;
        #   the remainder runs block by block.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < D
        mask_m = offs_m < Lq
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        K += b * skb + h * skh
        V += b * svb + h * svh
        lut = LUT + (pid_bh.to(tl.int64) * num_qb + (pid_m * BLOCK_M) // MAP_BQ) * n_sel
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if BLOCK_N <= MAP_BK:
            n_even = n_sel * MAP_BK if EVEN_N else (n_sel - 1) * MAP_BK
            for start in range(0, n_even, BLOCK_N):
                tok = tl.load(lut + start // MAP_BK) * MAP_BK + start % MAP_BK + offs_n
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K + tok[:, None] * skl + offs_d[None, :],
                                          V + tok[:, None] * svl + offs_d[None, :], tok < Lk, mask_d, qk_scale,
                                          False, PAD_D, TAU)
            for start in range(n_even, n_sel * MAP_BK, BLOCK_N):
                tok = tl.load(lut + start // MAP_BK) * MAP_BK + start % MAP_BK + offs_n
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K + tok[:, None] * skl + offs_d[None, :],
                                          V + tok[:, None] * svl + offs_d[None, :], tok < Lk, mask_d, qk_scale,
                                          True, PAD_D, TAU)
        else:
            # BLOCK_N = R * MAP_BK: a tile gathers R consecutive LUT entries (R whole blocks, rows
            # contiguous within each), unmasked; the entries left over (fewer than R, and the ragged
            # tail block, always the last entry) run as single-block tiles, masked.
            R: tl.constexpr = BLOCK_N // MAP_BK
            n_whole = n_sel if EVEN_N else n_sel - 1
            n_grouped = (n_whole // R) * R
            for e0 in range(0, n_grouped, R):
                tok = tl.load(lut + e0 + offs_n // MAP_BK) * MAP_BK + offs_n % MAP_BK
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K + tok[:, None] * skl + offs_d[None, :],
                                          V + tok[:, None] * svl + offs_d[None, :], tok < Lk, mask_d, qk_scale,
                                          False, PAD_D, TAU)
            offs_b = tl.arange(0, MAP_BK)
            for e in range(n_grouped, n_sel):
                tok = tl.load(lut + e) * MAP_BK + offs_b
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K + tok[:, None] * skl + offs_d[None, :],
                                          V + tok[:, None] * svl + offs_d[None, :], tok < Lk, mask_d, qk_scale,
                                          True, PAD_D, TAU)
        acc = acc / l_i[:, None]
        if STORE_LSE:
            tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)
        if STORE_OS:  # training: the sparse branch alone, for the backward's delta term
            tl.store(OS + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], acc.to(OS.dtype.element_ty),
                     mask=mask_m[:, None] & mask_d[None, :])
        if LINEAR:  # fused linear branch + projection (see _lin_fwd_tile)
            qblock = pid_bh.to(tl.int64) * num_qb + (pid_m * BLOCK_M) // MAP_BQ
            if FOLDED:  # phi(q) computed beforehand
                x = tl.load(FQ + b * sfb + h * sfh + offs_m[:, None] * sfl + offs_d[None, :],
                            mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            else:
                x = q
            acc += _lin_fwd_tile(x, HM, ZM, WT, qblock, D, offs_d, mask_d, lin_eps, FEATURE, FOLDED, FOLDED)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0)[None, :]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])

    @triton.jit
    def _sla_bwd_preprocess(O, DO, DELTA, H, Lq, D, sob, soh, sol, sdb, sdh, sdl,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # delta_r = sum_d dO[r, d] * O_s[r, d]  (fp32), the softmax-backward row term.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)

    @triton.jit
    def _dq_step(dq, q, do, lse, delta, k, v, tok_ok, qk_scale, MASK: tl.constexpr):
        # dQ += dS K over one loaded key tile, dS = P * (dO V^T - delta), P = exp2(S * c - lse2).
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:  # masked keys (zeros, or another head's keys in a descriptor tile): P = 0, and exp2(-lse)
            p = tl.where(tok_ok[None, :], p, 0.0)  # can never meet inf * 0
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.jit
    def _dq_tile(dq, q, do, lse, delta, kp, vp, tok_ok, mask_d, qk_scale, MASK: tl.constexpr, PAD_D: tl.constexpr):
        # `_dq_step` over a key tile loaded from pointers.
        k = _load2d(kp, tok_ok, mask_d, MASK, PAD_D)
        v = _load2d(vp, tok_ok, mask_d, MASK, PAD_D)
        return _dq_step(dq, q, do, lse, delta, k, v, tok_ok, qk_scale, MASK)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale):
        # dV += P^T dO and dK += dS^T Q over one query tile (q, do: (BLOCK_M, BLOCK_D)) for the key tile k, v.
        pT = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
        return dk, dv

    @triton.jit
    def _sla_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, LUT, HM, ZM, W, DHM, DZM, OL,
                           sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sgb, sgh, sgl,
                           H, Lq, Lk, D, n_sel, num_qb, tiles_per_bh, qk_scale, sm_scale, lin_eps,
                           MAP_BQ: tl.constexpr, MAP_BK: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr,
                           LINEAR: tl.constexpr, FEATURE: tl.constexpr, PAD_D: tl.constexpr):
        # Sparse branch: dQ = scale * sum over the LUT's keys of dS K (same tiling as the forward).
        # LINEAR: the linear branch's dQ part is added in the epilogue (_lin_bwd_q_tile).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < D
        mask_qd = (offs_m[:, None] < Lq) & mask_d[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=mask_qd, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :], mask=mask_qd, other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        K += b * skb + h * skh
        V += b * svb + h * svh
        lut = LUT + (pid_bh.to(tl.int64) * num_qb + (pid_m * BLOCK_M) // MAP_BQ) * n_sel
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if BLOCK_N <= MAP_BK:
            n_even = n_sel * MAP_BK if EVEN_N else (n_sel - 1) * MAP_BK
            for start in range(0, n_even, BLOCK_N):
                tok = tl.load(lut + start // MAP_BK) * MAP_BK + start % MAP_BK + offs_n
                dq = _dq_tile(dq, q, do, lse, delta, K + tok[:, None] * skl + offs_d[None, :],
                              V + tok[:, None] * svl + offs_d[None, :], tok < Lk, mask_d, qk_scale, False, PAD_D)
            for start in range(n_even, n_sel * MAP_BK, BLOCK_N):
                tok = tl.load(lut + start // MAP_BK) * MAP_BK + start % MAP_BK + offs_n
                dq = _dq_tile(dq, q, do, lse, delta, K + tok[:, None] * skl + offs_d[None, :],
                              V + tok[:, None] * svl + offs_d[None, :], tok < Lk, mask_d, qk_scale, True, PAD_D)
        else:
            for start in range(0, n_sel * MAP_BK, BLOCK_N):
                pos = start + offs_n
                entry = pos // MAP_BK
                tok = tl.load(lut + entry, mask=entry < n_sel, other=0) * MAP_BK + pos % MAP_BK
                dq = _dq_tile(dq, q, do, lse, delta, K + tok[:, None] * skl + offs_d[None, :],
                              V + tok[:, None] * svl + offs_d[None, :], (entry < n_sel) & (tok < Lk), mask_d,
                              qk_scale, True, PAD_D)
        dq = dq * sm_scale
        if LINEAR:  # fused linear branch (see _lin_bwd_q_tile)
            qblock = pid_bh.to(tl.int64) * num_qb + (pid_m * BLOCK_M) // MAP_BQ
            dq_lin, o_l = _lin_bwd_q_tile(q, do, HM, ZM, W, DHM, DZM, qblock, pid_bh.to(tl.int64) * tiles_per_bh + pid_m,
                                          D, offs_d, mask_d, lin_eps, FEATURE)
            dq += dq_lin
            tl.store(OL + b * sgb + h * sgh + offs_m[:, None] * sgl + offs_d[None, :], o_l.to(OL.dtype.element_ty),
                     mask=mask_qd)
        tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgl + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=mask_qd)

    @triton.jit
    def _key_block_queries(KV_OFF, KV_QIDX, pid_bh, num_kb, inv_len, kblk):
        """The key-major (CSR) table's entry for key block kblk of (batch, head) pid_bh: a pointer to its ascending
        list of selecting query blocks, and their count."""
        off_ptr = KV_OFF + pid_bh.to(tl.int64) * (num_kb + 1) + kblk
        first = tl.load(off_ptr)
        count = tl.load(off_ptr + 1) - first
        return KV_QIDX + pid_bh.to(tl.int64) * inv_len + first, count

    @triton.jit
    def _sla_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KV_OFF, KV_QIDX, DH, DZ,
                             sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                             sgb, sgh, sgl, H, Lq, Lk, D, num_kb, inv_len, qk_scale, sm_scale, inv_lk,
                             MAP_BQ: tl.constexpr, MAP_BK: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, LINEAR: tl.constexpr,
                             FEATURE: tl.constexpr):
        # One program: BLOCK_N keys (inside one map key block j) of one (batch, head). It walks
        # only the query blocks that selected j (key-major CSR table), BLOCK_M query tokens at a
        # time over their concatenation (count_j * MAP_BQ positions).
        # dV = sum P^T dO;  dK = scale * sum dS^T Q. Query rows past Lq load as q = dO = 0 with
        # lse = delta = 0, so their P^T dO and dS^T Q terms vanish -- no mask needed.
        # LINEAR: the linear branch's dK/dV parts are added in the epilogue (_lin_bwd_kv_tile).
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, BLOCK_M)
        mask_d = offs_d < D
        mask_kd = (offs_n[:, None] < Lk) & mask_d[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=mask_kd, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=mask_kd, other=0.0)
        Q += b * sqb + h * sqh
        DO += b * sdb + h * sdh
        LSE += pid_bh.to(tl.int64) * Lq
        DELTA += pid_bh.to(tl.int64) * Lq
        kblk = (pid_n * BLOCK_N) // MAP_BK
        qidx, count = _key_block_queries(KV_OFF, KV_QIDX, pid_bh, num_kb, inv_len, kblk)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in range(0, count * MAP_BQ, BLOCK_M):
            if BLOCK_M <= MAP_BQ:  # a tile inside one query block: scalar base, contiguous rows
                tok = tl.load(qidx + start // MAP_BQ) * MAP_BQ + start % MAP_BQ + offs_m
                valid = tok < Lq
            else:
                pos = start + offs_m
                entry = pos // MAP_BQ
                tok = tl.load(qidx + entry, mask=entry < count, other=0) * MAP_BQ + pos % MAP_BQ
                valid = (entry < count) & (tok < Lq)
            q = tl.load(Q + tok[:, None] * sql + offs_d[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
            do = tl.load(DO + tok[:, None] * sdl + offs_d[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
            lse = tl.load(LSE + tok, mask=valid, other=0.0)
            delta = tl.load(DELTA + tok, mask=valid, other=0.0)
            dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale)
        dk = dk * sm_scale
        if LINEAR:  # fused linear branch (see _lin_bwd_kv_tile)
            dk_lin, dv_lin = _lin_bwd_kv_tile(k, v, DH, DZ, pid_bh.to(tl.int64) * num_kb + kblk, D, offs_d, mask_d,
                                              inv_lk, FEATURE)
            dk += dk_lin
            dv += dv_lin
        tl.store(DK + b * sgb + h * sgh + offs_n[:, None] * sgl + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask_kd)
        tl.store(DV + b * sgb + h * sgh + offs_n[:, None] * sgl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask_kd)
