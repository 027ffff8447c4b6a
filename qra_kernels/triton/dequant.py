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

from .runtime import jit


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
