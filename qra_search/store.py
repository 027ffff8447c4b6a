"""What the search keeps of a model's weights, on disk, so memory grows with one layer.

* :class:`FloatStore` — the float weights of the searched layers, snapshotted before the
  evaluator starts overwriting them (one safetensors file, or RAM when there is no cache
  directory). Reads open and close the file each time, so pages read never stay mapped in
  the process (and in its resident set).
* :class:`HessianStore` — for GPTQ, each layer's calibration Hessian (float inputs), one
  file per layer.
* :class:`QuantStore` — every (layer, bits) quantized once with the packed format's own
  quantizer, with the top singular factors of its quantization error (the adapters'
  ``svd`` initialisation, :mod:`qra_kernels.lora_init`). Entries are computed one layer at
  a time and written as they are done (a killed run loses at most the layer in flight);
  once a bit-width is complete its entries are consolidated into one safetensors file that
  later runs open in milliseconds. Nothing dense is kept in memory.

:func:`quant_store` is the one factory: the search, ``qra quantize`` and ``qra demo`` build
their store through it from the same settings, so they read the same entries and what a
saved model holds is bit for bit what the search scored.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from qra_kernels._io import atomic_save
from qra_kernels.format import QuantizedWeight
from qra_kernels.lora_init import error_factors
from qra_kernels.modules import dense_weight
from qra_kernels.moe import EXPERT_QUANTIZERS
from qra_kernels.moe import QuantizedExperts, quantize_experts
from qra_kernels.quantizers import method_for_bits, quantize_weight

# Factors kept per entry: at least this many, so `qra quantize` (any rank <= 64) and a
# search with smaller ranks read the same entries. The SVD is exact, so the leading r of
# them equal a rank-r computation.
MIN_FACTORS = 64
ENTRY_FIELDS = ("qweight", "scales", "zeros", "B", "A", "sv")


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "F64": torch.float64}


class _Reader:
    """Reads single tensors of a safetensors file with ``os.pread`` — no memory map, so
    what was read is freed with the tensor and never lingers in the resident set. The
    header is parsed once per file (and again if the file is replaced)."""

    _headers: Dict[str, Tuple[float, int, dict]] = {}

    @classmethod
    def header(cls, path: str) -> Tuple[int, dict]:
        st = os.stat(path)
        cached = cls._headers.get(path)
        if cached is None or cached[0] != st.st_mtime_ns:
            import struct
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            cached = (st.st_mtime_ns, 8 + n, header)
            cls._headers[path] = cached
        return cached[1], cached[2]

    @classmethod
    def keys(cls, path: str):
        return [k for k in cls.header(path)[1] if k != "__metadata__"]

    @classmethod
    def get(cls, path: str, key: str) -> torch.Tensor:
        base, header = cls.header(path)
        info = header[key]
        start, end = info["data_offsets"]
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = bytearray(end - start)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = os.preadv(fd, [view[got:]], base + start + got)
                if n <= 0:
                    raise OSError(f"{path}: short read of {key!r}")
                got += n
        finally:
            os.close(fd)
        dtype = _DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _stream_save(path: str, items, metadata: Dict[str, str]) -> None:
    """Write a safetensors file from ``items`` ``[(key, dtype, shape, load)]`` — ``load()``
    returns the tensor — one tensor at a time (memory: one tensor), atomically."""
    import struct
    header, offset = {}, 0
    for key, dtype, shape, _ in items:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, dtype, shape, load in items:
                t = load().to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{key}: shape {tuple(t.shape)} != {tuple(shape)}")
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
    atomic_save(path, write)


def _copy_items(sources):
    """``_stream_save`` items that copy ``(key, src_path, src_key)`` from other files."""
    items = []
    for key, src, src_key in sources:
        info = _Reader.header(src)[1][src_key]
        items.append((key, _DTYPES[info["dtype"]], tuple(info["shape"]),
                      lambda src=src, src_key=src_key: _Reader.get(src, src_key)))
    return items


def _weight_hash(w: torch.Tensor) -> str:
    w = w.detach().to("cpu").contiguous()
    h = hashlib.sha1(memoryview(w.view(torch.uint8).numpy()) if w.numel() else b"")
    h.update(f"{tuple(w.shape)}{w.dtype}".encode())
    return h.hexdigest()[:20]


class FloatStore:
    """The float weights of the searched layers as they are now: ``[out, in]`` for a linear
    layer, ``[experts, out, in]`` for an expert group (``slots``: name → module, or name →
    :class:`~qra_search.weights.WeightSlot`)."""

    def __init__(self, slots: Mapping[str, object], cache_dir: Optional[str] = None):
        from .weights import WeightSlot
        slots = {n: s if isinstance(s, WeightSlot) else _module_slot(n, s)
                 for n, s in slots.items()}
        self.names = list(slots)
        self.hashes: Dict[str, str] = {}
        self._ram: Dict[str, torch.Tensor] = {}
        self.path = None

        def weight(s):
            return s.get().to("cpu", torch.float32).contiguous()

        for n, s in slots.items():
            self.hashes[n] = _weight_hash(weight(s))
        h = hashlib.sha1("".join(f"{n}={self.hashes[n]};" for n in self.names).encode())
        self.fingerprint = h.hexdigest()[:16]
        if cache_dir:
            d = os.path.join(cache_dir, "float")
            os.makedirs(d, exist_ok=True)
            self.path = os.path.join(d, f"{self.fingerprint}.safetensors")
            if not os.path.exists(self.path):
                _stream_save(self.path, [(n, torch.float32, s.shape, lambda s=s: weight(s))
                                         for n, s in slots.items()], {"format": "pt"})
        else:
            self._ram = {n: weight(s).clone() for n, s in slots.items()}

    def get(self, name: str) -> torch.Tensor:
        if self.path is None:
            return self._ram[name]
        return _Reader.get(self.path, name)


def _module_slot(name: str, module: nn.Module):
    from .weights import WeightSlot
    dense_weight(module)  # raises TypeError for anything but nn.Linear / Conv1D
    return WeightSlot(name, module, transposed=not isinstance(module, nn.Linear))


class HessianStore:
    """GPTQ's layer Hessians ``2·XᵀX/n`` over calibration tokens, with *float* inputs (each
    layer's entry then depends only on its own bits, so the search can combine entries),
    computed once block by block (:func:`qra_kernels.calibration.iter_hessians`) before
    anything is evaluated, and kept on disk one file per layer (RAM without a cache
    directory). ``store(name)`` returns a layer's Hessian."""

    def __init__(self, model: nn.Module, names: Iterable[str], tokens: torch.Tensor,
                 floats: FloatStore, cache_dir: Optional[str] = None, progress: bool = False):
        from qra_kernels.calibration import iter_hessians
        names = list(names)
        h = hashlib.sha1(floats.fingerprint.encode())
        h.update(str(tuple(tokens.shape)).encode() + tokens.numpy().tobytes())
        self.key = h.hexdigest()[:16]
        self.floats = floats
        self._ram: Dict[str, torch.Tensor] = {}
        self.dir = os.path.join(cache_dir, "hessians", self.key) if cache_dir else None
        if self.dir is not None and all(os.path.exists(self._path(n)) for n in names):
            return
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
        for block in iter_hessians(model, tokens, names, progress=progress):
            for n, hess in block.items():
                if self.dir is None:
                    self._ram[n] = hess
                elif not os.path.exists(self._path(n)):
                    _stream_save(self._path(n), [("H", torch.float32, tuple(hess.shape),
                                                  lambda hess=hess: hess)], {"format": "pt"})

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, f"{self.floats.hashes[name]}.safetensors")

    def __call__(self, name: str) -> torch.Tensor:
        if self.dir is None:
            return self._ram[name]
        return _Reader.get(self._path(name), "H")


class QuantStore:
    """Packed weights and error factors per (layer, bits) for one set of quantizer
    settings. ``get(name, bits)`` returns ``{"qw": QuantizedWeight, "B", "A", "sv",
    "err2"}``; ``B·A`` truncated to r is the best rank-r approximation of the error.

    An expert group (shape ``[experts, out, in]``) is quantized expert by expert exactly as
    :class:`qra_kernels.moe.QRAExperts` quantizes it (:func:`qra_kernels.moe.quantize_experts`,
    ``rtn``/``hqq``: where the method asks for GPTQ the experts take ``hqq``, as there); its
    ``qw`` is a :class:`~qra_kernels.moe.QuantizedExperts`, it has no error factors (no
    adapter on experts yet: ``B``/``A`` are empty, ``sv`` holds the error's Frobenius norm)."""

    def __init__(self, floats: FloatStore, shapes: Mapping[str, Tuple[int, int]],
                 group_size: int = 64, method: str = "recommended",
                 cache_dir: Optional[str] = None, max_rank: int = MIN_FACTORS,
                 scale_dtype: torch.dtype = torch.float16,
                 hessian: Optional[Callable[[str], torch.Tensor]] = None,
                 calibration_key: Optional[str] = None):
        self.floats, self.shapes = floats, dict(shapes)
        self.group_size, self.method, self.scale_dtype = group_size, method, scale_dtype
        self.factors = max(MIN_FACTORS, int(max_rank))
        self.hessian, self.calibration_key = hessian, calibration_key
        for b in (2, 3, 4, 8):
            m = method_for_bits(b, method)  # validates the method early
            if m == "gptq" and (hessian is None or calibration_key is None):
                raise ValueError("method 'gptq' needs calibration Hessians (hessian=, "
                                 "calibration_key=)")
        self.dir = os.path.join(cache_dir, "quant") if cache_dir else None
        self._ram: Dict[str, Dict[str, torch.Tensor]] = {}
        self._small: Dict[Tuple[str, int], Tuple[torch.Tensor, float]] = {}
        self._consolidated: Dict[int, Optional[str]] = {}

    # --- keys and files ------------------------------------------------------------------
    def is_experts(self, name: str) -> bool:
        return len(self.shapes[name]) == 3

    def layer_method(self, name: str, bits: int) -> str:
        """The quantizer layer ``name`` gets at ``bits``."""
        m = method_for_bits(bits, self.method)
        if self.is_experts(name) and m not in EXPERT_QUANTIZERS:
            return "hqq"  # no per-expert Hessians yet; what QRAExperts.from_experts does
        return m

    def settings_key(self, bits: int, method: Optional[str] = None) -> str:
        m = method or method_for_bits(bits, self.method)
        key = f"b{bits}-g{self.group_size}-{m}-{str(self.scale_dtype).removeprefix('torch.')}"
        if m == "gptq":
            key += f"-c{self.calibration_key}"
        return key

    def entry_key(self, name: str, bits: int) -> str:
        return f"{self.floats.hashes[name]}-{self.settings_key(bits, self.layer_method(name, bits))}"

    def _part_path(self, name: str, bits: int) -> Optional[str]:
        if self.dir is None:
            return None
        return os.path.join(self.dir, "parts", f"{self.entry_key(name, bits)}.safetensors")

    def _bundle_path(self, bits: int) -> Optional[str]:
        if self.dir is None:
            return None
        return os.path.join(self.dir, f"{self.floats.fingerprint}-{self.settings_key(bits)}"
                                      ".safetensors")

    # --- reading ---------------------------------------------------------------------------
    def _read(self, name: str, bits: int) -> Optional[Dict[str, torch.Tensor]]:
        key = self.entry_key(name, bits)
        if key in self._ram:
            return self._ram[key]
        if self.dir is None:
            return None
        part = self._part_path(name, bits)
        bundle = self._bundle_path(bits)
        for path, prefix in ((part, ""), (bundle, f"{self.floats.hashes[name]}.")):
            if path and os.path.exists(path):
                try:
                    if f"{prefix}qweight" not in _Reader.header(path)[1]:
                        continue
                    return {k: _Reader.get(path, prefix + k) for k in ENTRY_FIELDS}
                except Exception:  # noqa: BLE001 - a torn part from a killed run: recompute
                    continue
        return None

    def _complete(self, name: str, e: Optional[dict]) -> bool:
        if e is None:
            return False
        if self.is_experts(name):
            return True
        return e["B"].shape[1] >= min(self.factors, min(self.shapes[name]))

    def has(self, name: str, bits: int) -> bool:
        return self._complete(name, self._read(name, bits))

    def get(self, name: str, bits: int) -> dict:
        e = self._read(name, bits)
        if not self._complete(name, e):
            e = self._compute(name, bits)
        if self.is_experts(name):
            qw = QuantizedExperts(e["qweight"], e["scales"], e["zeros"],
                                  [bits] * self.shapes[name][0], self.group_size,
                                  self.shapes[name])
        else:
            qw = QuantizedWeight(e["qweight"], e["scales"], e["zeros"], bits, self.group_size,
                                 self.shapes[name])
        sv = e["sv"]
        self._small[(name, bits)] = (sv, float((sv.double() ** 2).sum()))
        return {"qw": qw, "B": e["B"], "A": e["A"], "sv": sv,
                "err2": self._small[(name, bits)][1]}

    def spectrum(self, name: str, bits: int) -> Tuple[torch.Tensor, float]:
        """(singular values of the error, ‖error‖²) — small, kept in memory."""
        if (name, bits) not in self._small:
            self.get(name, bits)
        return self._small[(name, bits)]

    def recovered_fraction(self, name: str, bits: int, rank: int) -> float:
        """Share of ‖W − Wq‖² that the rank-``rank`` initial adapter removes (none for an
        expert group, which takes no adapter)."""
        sv, err2 = self.spectrum(name, bits)
        if rank <= 0 or err2 <= 0 or self.is_experts(name):
            return 0.0
        return float((sv[:rank].double() ** 2).sum()) / err2

    def effective_weight(self, name: str, bits: int, rank: int) -> torch.Tensor:
        """``dequant(Wq) + B[:, :r]·A[:r]`` fp32 ``[out, in]`` — what ``QRALinear`` with the
        svd-initialised adapter computes (``[experts, out, in]``, rank 0, for an expert
        group: what ``QRAExperts`` computes)."""
        e = self.get(name, bits)
        dense = e["qw"].dequantize(torch.float32)
        if self.is_experts(name):
            if rank:
                raise ValueError(f"{name!r} is an expert group: it takes no LoRA yet (rank 0), "
                                 f"got rank {rank}")
            return dense
        if rank <= 0:
            return dense
        r = min(rank, e["B"].shape[1])
        return torch.addmm(dense, e["B"][:, :r], e["A"][:r])

    # --- computing ------------------------------------------------------------------------
    def _compute(self, name: str, bits: int) -> Dict[str, torch.Tensor]:
        w = self.floats.get(name)
        m = self.layer_method(name, bits)
        pad = w.shape[-1] % self.group_size != 0
        if self.is_experts(name):
            qw = quantize_experts(w, bits, self.group_size, m, scale_dtype=self.scale_dtype,
                                  pad=pad)
            err = (w - qw.dequantize(torch.float32)).double().norm().float()
            B, A, sv = w.new_zeros(w.shape[1], 0), w.new_zeros(0, w.shape[2]), err.reshape(1)
        else:
            extra = {"hessian": self.hessian(name)} if m == "gptq" else {}
            qw = quantize_weight(w, bits, self.group_size, m, scale_dtype=self.scale_dtype,
                                 pad=pad, **extra)
            B, A, sv = error_factors(w, qw.dequantize(torch.float32), self.factors)
        e = {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros, "B": B, "A": A,
             "sv": sv}
        path = self._part_path(name, bits)
        if path is None:
            self._ram[self.entry_key(name, bits)] = e
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _stream_save(path, [(k, v.dtype, tuple(v.shape), lambda v=v: v)
                                for k, v in e.items()], {"format": "pt"})
        return e

    def fill(self, bits_choices: Iterable[int], names: Optional[Iterable[str]] = None,
             progress: bool = False) -> None:
        """Compute every missing entry, one layer at a time, then consolidate each
        bit-width into one file."""
        names = list(names) if names is not None else list(self.shapes)
        bits_choices = sorted(set(bits_choices))
        jobs = [(n, b) for b in bits_choices for n in names]
        it = jobs
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(jobs, desc="quantizing", unit="layer×bits")
        for n, b in it:
            if not self.has(n, b):
                self._compute(n, b)
        for b in bits_choices:
            self._consolidate(b, names)

    def _consolidate(self, bits: int, names) -> None:
        bundle = self._bundle_path(bits)
        if bundle is None:
            return
        parts = [(n, self._part_path(n, bits)) for n in names]
        if os.path.exists(bundle) and not any(os.path.exists(p) for _, p in parts):
            return
        sources, seen = [], set()
        for n, part in parts:
            h = self.floats.hashes[n]
            if h in seen:
                continue  # tied weights share one entry
            seen.add(h)
            if os.path.exists(part):
                src, prefix = part, ""
            elif os.path.exists(bundle) and f"{h}.qweight" in _Reader.header(bundle)[1]:
                src, prefix = bundle, f"{h}."
            else:
                return  # incomplete: keep the parts
            sources += [(f"{h}.{k}", src, prefix + k) for k in ENTRY_FIELDS]
        if any(src == bundle for _, src, _ in sources):
            # Rewriting the bundle from itself: stage it under another name first.
            staged = f"{bundle}.old"
            os.replace(bundle, staged)
            _Reader._headers.pop(bundle, None)
            sources = [(k, staged if s == bundle else s, sk) for k, s, sk in sources]
        _stream_save(bundle, _copy_items(sources),
                     {"layers": json.dumps({n: self.floats.hashes[n] for n in names})})
        for _, p in parts:
            if p and os.path.exists(p):
                os.remove(p)
        if os.path.exists(f"{bundle}.old"):
            os.remove(f"{bundle}.old")


def quant_store(model: nn.Module, names: Iterable[str], *, group_size: int, method: str,
                cache_dir: Optional[str], max_rank: int = MIN_FACTORS,
                floats: Optional[FloatStore] = None,
                hessian_tokens: Optional[torch.Tensor] = None,
                progress: bool = False) -> QuantStore:
    """The one way to build a :class:`QuantStore` (module docstring). A method that uses
    GPTQ at any bit-width needs ``hessian_tokens`` (calibration token ids); its Hessians are
    measured here, on the model as it is now (float)."""
    from .weights import weight_slots
    names = list(names)
    slots = weight_slots(model, names)
    if floats is None:
        floats = FloatStore(slots, cache_dir)
    shapes = {n: s.shape for n, s in slots.items()}
    hessian = key = None
    linear = [n for n in names if len(shapes[n]) == 2]  # expert groups take no Hessian
    if any(method_for_bits(b, method) == "gptq" for b in (2, 3, 4, 8)):
        if hessian_tokens is None:
            raise ValueError("method 'gptq' needs calibration tokens for its Hessians "
                             "(hessian_tokens=)")
        hessian = HessianStore(model, linear, hessian_tokens, floats, cache_dir, progress)
        key = hessian.key
    return QuantStore(floats, shapes, group_size, method, cache_dir, max_rank,
                      hessian=hessian, calibration_key=key)


def allocation_store(store: QuantStore):
    """The :data:`qra_kernels.modules.WeightStore` view of a :class:`QuantStore`, for
    ``quantize_model(..., store=...)``: each layer gets the packed weight and error factors
    the search scored (an expert group: its ``QuantizedExperts``, no factors)."""
    def get(name: str, module: nn.Module, bits: int):
        e = store.get(name, bits)
        if store.is_experts(name):
            return e["qw"], None
        return e["qw"], (e["B"], e["A"])
    return get


__all__ = ["FloatStore", "HessianStore", "QuantStore", "quant_store", "allocation_store",
           "MIN_FACTORS"]
