"""Reading the packed layout of :mod:`qra_kernels.format` inside a kernel.

A plane of width ``p`` holds ``32 / p`` consecutive ``k`` of one column in one int32 word
(word row ``r``: ``k = r * (32 / p) + j`` at bits ``[j*p, (j+1)*p)``). A tile of
``BLOCK_K`` codes is therefore ``BLOCK_K * p / 32`` whole word rows: each word is loaded
once (N-contiguous, coalesced) and expanded in registers with one shift and one mask, and
the ``[rows, 32/p, BLOCK_N]`` expansion reshapes row-major straight into k order.

Every caller keeps ``BLOCK_K`` a multiple of 32, so a tile never splits a word of any
plane, and either a divisor of the group size (the tile lies in one group: one row of
scales and zeros) or a multiple of it (the memory-bound decode kernel wants long K tiles
even at group 32: each 32-long chunk of the tile then gets its group's row). Word rows
past ``Kp`` (a long tile over the end of a padded matrix) are masked to code 0 with scale
0 (x is masked to 0 past K as well).
"""
from __future__ import annotations

import triton.language as tl

from .runtime import jit, sum_axis


@jit
def _load_plane(qw_ptr, N, Kp, row0, k0, offs_n, mask_n, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // WIDTH
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    rows = k0 // PER_WORD + tl.arange(0, ROWS)
    mask = (rows < Kp // PER_WORD)[:, None] & mask_n[None, :]
    words = tl.load(qw_ptr + (row0 + rows)[:, None].to(tl.int64) * N + offs_n[None, :],
                    mask=mask, other=0)
    shifts = tl.arange(0, PER_WORD) * WIDTH
    # The arithmetic shift sign-extends the top word; the mask keeps only this code.
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@jit
def load_codes(qw_ptr, N, Kp, k0, offs_n, mask_n, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr, BITS: tl.constexpr):
    """int32 codes ``[BLOCK_K, BLOCK_N]`` for ``k`` in ``[k0, k0 + BLOCK_K)``."""
    if BITS == 3:
        # 3 = a 2-bit plane (Kp/16 word rows) then a 1-bit plane (Kp/32 word rows).
        low = _load_plane(qw_ptr, N, Kp, 0, k0, offs_n, mask_n, BLOCK_K, BLOCK_N, 2)
        high = _load_plane(qw_ptr, N, Kp, Kp // 16, k0, offs_n, mask_n, BLOCK_K, BLOCK_N, 1)
        codes = low | (high << 2)
    else:
        codes = _load_plane(qw_ptr, N, Kp, 0, k0, offs_n, mask_n, BLOCK_K, BLOCK_N, BITS)
    return codes


@jit
def dequant_tile(qw_ptr, scales_ptr, zeros_ptr, N, Kp, k0, offs_n, mask_n,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
                 GROUP: tl.constexpr):
    """fp32 ``W[offs_n, k0:k0+BLOCK_K]ᵀ`` as a ``[BLOCK_K, BLOCK_N]`` tile: ``(q - z) * s``."""
    codes = load_codes(qw_ptr, N, Kp, k0, offs_n, mask_n, BLOCK_K, BLOCK_N, BITS)
    if BLOCK_K <= GROUP:
        group = k0 // GROUP
        s = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = (codes.to(tl.float32) - z[None, :]) * s[None, :]
    else:
        # 32-long chunks (32 divides every group size), one scale/zero row per chunk:
        # BLOCK_K / 32 small loads per column instead of one per code.
        CHUNKS: tl.constexpr = BLOCK_K // 32
        groups = (k0 + tl.arange(0, CHUNKS) * 32) // GROUP
        mask = (groups < Kp // GROUP)[:, None] & mask_n[None, :]
        offs = groups[:, None] * N + offs_n[None, :]
        s = tl.load(scales_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.reshape(codes.to(tl.float32), (CHUNKS, 32, BLOCK_N))
        w = tl.reshape((w - z[:, None, :]) * s[:, None, :], (BLOCK_K, BLOCK_N))
    return w


@jit
def dot_rows(x_ptr, qw_ptr, scales_ptr, zeros_ptr, N, K, Kp, k0, offs_n, mask_n,
             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
             GROUP: tl.constexpr):
    """One row of x times the W tile at ``k0``, kept per word row of the first plane:
    ``[BLOCK_K·w/32, BLOCK_N]`` fp32 (``w`` = 2 for 3 bits, else ``BITS``); summing the rows
    gives ``x[k0:k0+BLOCK_K]·W[offs_n, k0:k0+BLOCK_K]ᵀ``.

    The decode path for one row of x, with no transpose and no layout change of the tile:
    each thread expands the words it loaded (16-byte loads along N) code slot by code slot
    (a static loop over the 32/w slots of a word, each an elementwise op on the words
    tile), multiplies by the slot's x (a vector over word rows, broadcast along N) and
    accumulates with FMAs. A code becomes an exact fp32 with the magic exponent
    (``code | 0x4B000000`` is ``2^23 + code``; one subtraction) instead of an int-to-float
    conversion, and the zero point is applied once per word row:
    ``s·(sum_j x_j q_j - z·sum_j x_j)``. 3 bits: the 1-bit plane's word of each 32 k is read
    for both 2-bit rows (a cached reload) and its bits shifted into place.
    """
    W0: tl.constexpr = 2 if BITS == 3 else BITS
    PER_WORD: tl.constexpr = 32 // W0
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    r = tl.arange(0, ROWS)
    rows = k0 // PER_WORD + r
    mask = (rows < Kp // PER_WORD)[:, None] & mask_n[None, :]
    words = tl.load(qw_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask,
                    other=0)
    if BITS == 3:
        hrows = Kp // 16 + k0 // 32 + r // 2
        high = tl.load(qw_ptr + hrows[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask,
                       other=0)
        high = high >> ((r % 2) * 16)[:, None]
    t = tl.full((ROWS, BLOCK_N), 0.0, tl.float32)
    xs = tl.full((ROWS,), 0.0, tl.float32)
    for jj in tl.static_range(PER_WORD):
        kk = k0 + r * PER_WORD + jj
        xj = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        xs += xj
        if BITS != 3 and jj * W0 + W0 <= 23:
            # The code fits fp32's mantissa where it sits: 2^23 + q·2^(w·jj) with one AND+OR
            # (no shift), and x·2^-(w·jj) (exact) undoes the position.
            q = ((words & (((1 << W0) - 1) << (jj * W0))) | 0x4B000000).to(tl.float32,
                                                                            bitcast=True)
            t += (q - 8388608.0) * (xj * (1.0 / (1 << (jj * W0))))[:, None]
        else:
            code = (words >> (jj * W0)) & ((1 << W0) - 1)
            if BITS == 3:
                code = code | (((high >> jj) & 1) << 2)
            q = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            t += q * xj[:, None]
    groups = (k0 + r * PER_WORD) // GROUP
    gmask = (groups < Kp // GROUP)[:, None] & mask_n[None, :]
    offs = groups[:, None] * N + offs_n[None, :]
    s = tl.load(scales_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(zeros_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    return s * (t - z * xs[:, None])
