"""The packed layout of one group-quantized matrix (see docs/FORMAT.md).

This file is the single place the layout is defined. Every kernel (reference, Triton,
CUDA, CPU) reads exactly these tensors; serialized checkpoints depend on them.

Summary for a weight ``W`` of shape ``[N, K]`` (out_features, in_features), ``bits`` in
{2, 3, 4, 8}, ``group_size`` ``g`` in {32, 64, 128}:

* ``Kp = ceil(K / g) * g``; columns ``K..Kp-1`` are zero padding (only when padding was
  asked for at quantization time).
* codes ``q[n, k]`` are unsigned ``bits``-bit integers; ``W[n, k] ≈ (q[n, k] - z) * s``
  with ``s = scales[k // g, n]`` and ``z = zeros[k // g, n]`` (both fp16 or bf16; ``z`` is
  a float, not an integer, so HQQ-style refinement can move it).
* the codes are split into power-of-two *bit-planes*: 2 → [2], 3 → [2, 1] (low two
  bits, then the high bit), 4 → [4], 8 → [8]. A plane of width ``p`` packs ``32 / p``
  consecutive ``k`` of one column ``n`` into one int32 word: word row ``r`` holds
  ``k = r * (32 / p) + j`` at bits ``[j * p, (j + 1) * p)``. Planes are stacked along the
  row dimension of one int32 tensor ``qweight`` of shape ``[Kp * bits / 32, N]``, so a
  kernel tile over ``(k, n)`` reads wide, aligned, N-contiguous words and dequantizes
  with one shift and one mask per plane — no code ever straddles a word.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = (torch.float16, torch.bfloat16)

# (width, bit offset inside the code) of each plane, low bits first.
PLANES: Dict[int, Tuple[Tuple[int, int], ...]] = {
    2: ((2, 0),),
    3: ((2, 0), (1, 2)),
    4: ((4, 0),),
    8: ((8, 0),),
}

# Version of the serialized layout; bump on any change to what is stored.
FORMAT_VERSION = 1


def check_bits(bits, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int in {SUPPORTED_BITS}, got {type(bits).__name__}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def check_group_size(group_size, name: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(
            f"{name} must be an int in {SUPPORTED_GROUP_SIZES}, got {type(group_size).__name__}"
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    return group_size


def padded_in_features(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size) * group_size


def packed_nbytes(out_features: int, in_features: int, bits: int, group_size: int,
                  scale_bytes: int = 2) -> int:
    """Bytes stored for one matrix: codes + scales + zeros (docs/FORMAT.md, "Byte count").

    ``Kp = ceil(K / g) * g``; ``nbytes = N * Kp * bits / 8 + 2 * scale_bytes * N * Kp / g``.
    """
    check_bits(bits)
    check_group_size(group_size)
    kp = padded_in_features(in_features, group_size)
    return out_features * kp * bits // 8 + 2 * scale_bytes * out_features * (kp // group_size)


def lora_nbytes(out_features: int, in_features: int, rank: int, element_size: int = 4) -> int:
    """Bytes of a rank-``rank`` LoRA adapter: A ``[r, in]`` + B ``[out, r]``."""
    return rank * (in_features + out_features) * element_size


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[N, Kp]`` (any integer dtype) into ``qweight [Kp*bits/32, N]``."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-d [N, Kp], got shape {tuple(codes.shape)}")
    n, kp = codes.shape
    if kp % 32:
        raise ValueError(f"codes: the packed dimension must be a multiple of 32, got {kp}")
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    planes = []
    for width, offset in PLANES[bits]:
        per_word = 32 // width
        plane = (codes >> offset) & ((1 << width) - 1)  # [N, Kp]
        plane = plane.view(n, kp // per_word, per_word)
        shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * width
        words = (plane << shifts).sum(dim=-1)  # [N, Kp/per_word], values in [0, 2^32)
        # Reinterpret as int32 (two's complement) so the words are the exact bit patterns.
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        planes.append(words.t())
    return torch.cat(planes, dim=0).contiguous()


def unpack(qweight: torch.Tensor, bits: int, padded_k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``qweight [Kp*bits/32, N]`` → codes ``[N, Kp]`` as uint8."""
    check_bits(bits)
    if qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be int32, got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[0] * 32 != padded_k * bits:
        raise ValueError(
            f"qweight must have shape [{padded_k * bits // 32}, N] for bits={bits} and "
            f"Kp={padded_k}, got {tuple(qweight.shape)}"
        )
    n = qweight.shape[1]
    codes = torch.zeros(n, padded_k, dtype=torch.int32, device=qweight.device)
    row = 0
    for width, offset in PLANES[bits]:
        per_word = 32 // width
        rows = padded_k // per_word
        words = qweight[row:row + rows].t()  # [N, rows]
        shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int32) * width
        # Arithmetic right shift sign-extends, but the mask keeps only the plane's bits.
        plane = (words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)  # [N, rows, per_word]
        codes |= plane.reshape(n, padded_k) << offset
        row += rows
    return codes.to(torch.uint8)


class QuantizedWeight:
    """A packed group-quantized matrix: ``qweight``, ``scales``, ``zeros`` and its shape.

    ``shape`` is the logical ``(out_features, in_features)``; ``padded_in_features`` may be
    larger when the matrix was quantized with ``pad=True``.
    """

    __slots__ = ("qweight", "scales", "zeros", "bits", "group_size", "shape")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, group_size: int, shape):
        check_bits(bits)
        check_group_size(group_size)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (out_features, in_features) >= 1, got {shape}")
        n, k = shape
        kp = padded_in_features(k, group_size)
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != (kp * bits // 32, n):
            raise ValueError(
                f"qweight must be int32 of shape {(kp * bits // 32, n)}, got "
                f"{qweight.dtype} {tuple(qweight.shape)}"
            )
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t.dtype not in SCALE_DTYPES:
                raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
            if tuple(t.shape) != (kp // group_size, n):
                raise ValueError(
                    f"{name} must have shape {(kp // group_size, n)}, got {tuple(t.shape)}"
                )
        if scales.dtype != zeros.dtype:
            raise TypeError(f"scales and zeros must share a dtype, got {scales.dtype}, {zeros.dtype}")
        self.qweight, self.scales, self.zeros = qweight, scales, zeros
        self.bits, self.group_size, self.shape = bits, group_size, shape

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def padded_in_features(self) -> int:
        return padded_in_features(self.shape[1], self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def codes(self) -> torch.Tensor:
        """The unpacked codes ``[N, Kp]`` (uint8)."""
        return unpack(self.qweight, self.bits, self.padded_in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - z) * s`` as a dense ``[N, K]`` tensor, computed in fp32 then cast."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                          self.shape, dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.qweight.to(device), self.scales.to(device),
                               self.zeros.to(device), self.bits, self.group_size, self.shape)

    # --- a plain dict of tensors, for state_dict / safetensors -------------------------
    def to_dict(self) -> Dict[str, torch.Tensor]:
        meta = torch.tensor([FORMAT_VERSION, self.bits, self.group_size, *self.shape],
                            dtype=torch.int64)
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros,
                "meta": meta}

    @classmethod
    def from_dict(cls, d: Dict[str, torch.Tensor]) -> "QuantizedWeight":
        missing = {"qweight", "scales", "zeros", "meta"} - set(d)
        if missing:
            raise ValueError(f"quantized weight dict is missing {sorted(missing)}")
        meta = [int(v) for v in d["meta"].tolist()]
        if len(meta) != 5:
            raise ValueError(f"meta must hold [version, bits, group_size, N, K], got {meta}")
        version, bits, group_size, n, k = meta
        if version != FORMAT_VERSION:
            raise ValueError(f"meta: format version {version} is not supported "
                             f"(this build reads {FORMAT_VERSION})")
        return cls(d["qweight"], d["scales"], d["zeros"], bits, group_size, (n, k))

    def __repr__(self) -> str:
        return (f"QuantizedWeight(shape={self.shape}, bits={self.bits}, "
                f"group_size={self.group_size}, scale_dtype={self.scales.dtype}, "
                f"nbytes={self.nbytes})")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` from the packed tensors; the reference every kernel is tested against."""
    n, k = shape
    kp = padded_in_features(k, group_size)
    codes = unpack(qweight, bits, kp).to(torch.float32)  # [N, Kp]
    s = scales.to(torch.float32).t().repeat_interleave(group_size, dim=1)  # [N, Kp]
    z = zeros.to(torch.float32).t().repeat_interleave(group_size, dim=1)
    w = (codes - z) * s
    return w[:, :k].to(dtype)


# --- routed experts: E matrices of one projection, stored as one stack ---------------------
def expert_code_rows(bits, padded_k: int):
    """``[(first, end), ...]``: the rows of each expert's codes in a stacked experts
    ``qweight`` (docs/FORMAT.md, "Experts").

    E matrices ``[N, K]`` of one projection (a MoE layer's ``gate_up_proj``, say) are stored
    as one ``qweight`` of shape ``[Σₑ Kp·bitsₑ/32, N]``: each expert's codes exactly as one
    matrix stores them, stacked in expert order. Bits may differ per expert, which is why the
    codes are stacked along rows and not as a 3-D tensor; ``scales``/``zeros`` do not depend
    on the bits and are plain ``[E, Kp/g, N]``.
    """
    out, row = [], 0
    for e, b in enumerate(bits):
        check_bits(b, f"bits[{e}]")
        rows = padded_k * b // 32
        out.append((row, row + rows))
        row += rows
    return out


def experts_packed_nbytes(out_features: int, in_features: int, bits, group_size: int,
                          scale_bytes: int = 2) -> int:
    """Bytes stored for one projection's experts: the sum of :func:`packed_nbytes` over
    experts (``bits`` has one entry per expert)."""
    return sum(packed_nbytes(out_features, in_features, b, group_size, scale_bytes)
               for b in bits)
