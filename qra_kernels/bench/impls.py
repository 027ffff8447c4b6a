"""The implementations a benchmark row can measure: every qra backend, and the peers.

An implementation turns a float weight into its own stored form once (``prepare``) and
then computes ``y = x·Wᵀ`` (+ a LoRA adapter) from it (``call``). Everything a call reads
lives in one ``state`` dict, so the runner can deep-copy it for its cache protocol
(:mod:`qra_kernels.bench.timing`).

qra backends fuse the adapter into the op; peers have no fused adapter, so for rank > 0
they add it the way a QLoRA stack does (``base(x) + s·(x·Aᵀ)·Bᵀ`` as two small matmuls).
Peers that cannot run a case (wrong bit-width, wrong device, missing package) say why;
the runner records the reason in the report instead of a number.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import qra_kernels as qk
from qra_kernels.backends import _REGISTRY, BackendUnavailableError, _ensure_loaded
from qra_kernels.ops import linear_packed

__all__ = ["Impl", "Base", "Prepared", "CannotRun", "qra_impls", "peer_impls", "tensor_bytes"]


class CannotRun(Exception):
    """This implementation cannot run this case; the message says why."""


@dataclass
class Prepared:
    state: Dict[str, Any]                 # what a call reads (x included)
    call: Callable[[Dict[str, Any]], torch.Tensor]
    weight_bytes: int                     # stored bytes of the weight in this format


@dataclass
class Impl:
    name: str
    family: str                           # "qra" or "peer"
    package: str                          # the distribution that provides it
    description: str
    bits: Tuple[int, ...]                 # bit-widths it implements; () = a float weight
    devices: Tuple[str, ...]              # "cpu", "cuda"
    _prepare: Callable[..., Tuple[Dict[str, Any], Callable, int]] = field(repr=False)
    activation_dtype: Optional[torch.dtype] = None  # forced dtype of x (dense bf16), else the run's
    unavailable: Optional[str] = None     # why it cannot run at all on this machine

    @property
    def float_weight(self) -> bool:
        return not self.bits

    def why_not(self, bits: Optional[int], device: torch.device) -> Optional[str]:
        if self.unavailable:
            return self.unavailable
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)} only, not {device.type}"
        if bits is not None and self.bits and bits not in self.bits:
            return f"implements {'/'.join(map(str, self.bits))}-bit only, not {bits}-bit"
        return None

    def prepare(self, weight: torch.Tensor, bits: Optional[int], group_size: int,
                act_dtype: torch.dtype) -> "Base":
        """Convert ``weight`` to this implementation's stored form (once per shape/bits)."""
        reason = self.why_not(bits, weight.device)
        if reason:
            raise CannotRun(reason)
        try:
            state, call, weight_bytes = self._prepare(weight, bits, group_size, act_dtype)
        except CannotRun:
            raise
        except Exception as e:  # noqa: BLE001 - a peer's own failure is a result to report
            raise CannotRun(_one_line(e)) from None
        return Base(state, call, weight_bytes)

    def bind(self, base: "Base", x: torch.Tensor,
             lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]]) -> Prepared:
        """A call on activations ``x`` with an optional adapter ``(A, B, scaling)``."""
        state = dict(base.state, x=x)
        call = base.call
        if lora is not None:
            state.update(lora_A=lora[0], lora_B=lora[1], scaling=lora[2])
            if self.family != "qra":  # qra's op fuses the adapter; peers add it unfused

                def call(s, base_call=base.call):
                    return base_call(s) + s["scaling"] * ((s["x"] @ s["lora_A"].t())
                                                          @ s["lora_B"].t())
        return Prepared(state, call, base.weight_bytes)


@dataclass
class Base:
    state: Dict[str, Any]
    call: Callable[[Dict[str, Any]], torch.Tensor]
    weight_bytes: int


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def tensor_bytes(obj: Any, _seen=None, _depth: int = 0) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (modules, dicts, lists,
    plain objects): the memory a peer's stored weight really occupies."""
    seen = set() if _seen is None else _seen
    if _depth > 6:
        return 0
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return 0
        key = (obj.untyped_storage().data_ptr(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, torch.nn.Module):
        total = sum(tensor_bytes(t, seen, _depth + 1) for t in obj.parameters(recurse=True))
        total += sum(tensor_bytes(t, seen, _depth + 1) for t in obj.buffers(recurse=True))
        return total + tensor_bytes(vars(obj), seen, _depth + 1)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen, _depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return tensor_bytes(vars(obj), seen, _depth + 1)
    if hasattr(obj, "__slots__"):
        return sum(tensor_bytes(getattr(obj, a, None), seen, _depth + 1) for a in obj.__slots__)
    return 0


def package_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------
# qra: one implementation per registered backend that can run on this machine
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def selected_backend(name: str):
    """Run the op on backend ``name`` for the duration; restores the previous choice."""
    import qra_kernels.backends as reg
    previous = reg._selected
    qk.set_backend(name)
    try:
        yield
    finally:
        reg._selected = previous


def _qra_prepare(backend: str):
    def prepare(weight, bits, group_size, act_dtype):
        # RTN: the quantizer changes the values, not the bytes or the kernel's work.
        qw = qk.quantize_weight(weight.float(), bits, group_size, method="rtn")
        n = qw.out_features
        probe = torch.zeros(1, qw.in_features, dtype=act_dtype, device=weight.device)
        ok, why = _REGISTRY[backend].supports(probe)
        if not ok:
            raise CannotRun(why)

        def call(s):
            with selected_backend(backend):
                return linear_packed(s["x"], s["qweight"], s["scales"], s["zeros"], bits,
                                     group_size, n, s.get("lora_A"), s.get("lora_B"),
                                     s.get("scaling", 1.0))
        state = {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros}
        return state, call, qw.nbytes
    return prepare


def qra_impls() -> List[Impl]:
    """One Impl per backend in the registry, in registry order; unusable ones carry the
    registry's reason (so the report lists them)."""
    _ensure_loaded()
    out = []
    for name, backend in _REGISTRY.items():
        ok, why = backend.available()
        out.append(Impl(name=f"qra:{name}", family="qra", package="qra",
                        description=f"qra::linear on the {name!r} backend",
                        bits=tuple(qk.SUPPORTED_BITS), devices=("cpu", "cuda"),
                        _prepare=_qra_prepare(name), unavailable=None if ok else why))
    return out


# ----------------------------------------------------------------------------------------
# peers
# ----------------------------------------------------------------------------------------

def _dense(dtype):
    def prepare(weight, bits, group_size, act_dtype):
        w = weight.to(dtype).contiguous()
        return {"w": w}, (lambda s: F.linear(s["x"], s["w"])), w.numel() * w.element_size()
    return prepare


def _int8pack(weight, bits, group_size, act_dtype):
    # Weight-only int8, symmetric per output channel (the op has no groups).
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-8)
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
    scale = scale.to(act_dtype)
    fn = torch._weight_int8pack_mm
    return ({"q": q, "scale": scale}, lambda s: fn(s["x"], s["q"], s["scale"]),
            q.numel() + scale.numel() * scale.element_size())


def _int4_groups(weight, group_size):
    """Asymmetric 4-bit codes and tinygemm's (scale, zero) pairs: w = (q - 8)·s + z."""
    n, k = weight.shape
    if k % group_size:
        raise CannotRun(f"group_size {group_size} does not divide in_features {k}")
    wg = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    zero = lo + 8 * scale
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [K/g, N, 2]
    return q.reshape(n, k), scales_and_zeros


def _int4pack_cpu(weight, bits, group_size, act_dtype):
    q, sz = _int4_groups(weight, group_size)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = sz.to(act_dtype)
    fn = torch._weight_int4pack_mm_for_cpu
    return ({"w": packed, "sz": sz}, lambda s: fn(s["x"], s["w"], group_size, s["sz"]),
            packed.numel() * packed.element_size() + sz.numel() * sz.element_size())


def _int4pack_cuda(weight, bits, group_size, act_dtype):
    if act_dtype != torch.bfloat16:
        raise CannotRun(f"tinygemm takes bfloat16 activations, the run uses {act_dtype}")
    q, sz = _int4_groups(weight, group_size)
    # Two codes per byte, even k in the high nibble (the layout the CUDA packer expects).
    q8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch._convert_weight_to_int4pack(q8, 8)
    sz = sz.to(torch.bfloat16)
    fn = torch._weight_int4pack_mm
    return ({"w": packed, "sz": sz}, lambda s: fn(s["x"], s["w"], group_size, s["sz"]),
            packed.numel() * packed.element_size() + sz.numel() * sz.element_size())


def _quiet_import(module: str):
    # bitsandbytes prints a warning on import when its optional Hub kernels are missing;
    # capture it so the report can state it instead of littering the progress output.
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        mod = importlib.import_module(module)
    return mod, buf.getvalue().strip()


def _bnb_nf4(weight, bits, group_size, act_dtype):
    bnb, _ = _quiet_import("bitsandbytes")
    import bitsandbytes.functional as bnbF
    qw, state = bnbF.quantize_4bit(weight.to(act_dtype).contiguous(), blocksize=group_size,
                                   quant_type="nf4")
    # No 2-level ("double") quantization of absmax: the plain NF4 layout.
    matmul = bnb.matmul_4bit
    return ({"qw": qw, "qs": state},
            lambda s: matmul(s["x"], s["qw"].t(), quant_state=s["qs"]),
            tensor_bytes(qw) + tensor_bytes(state))


def _hqq(weight, bits, group_size, act_dtype):
    _quiet_import("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    HQQLinear.set_backend(HQQBackend.PYTORCH)  # HQQ's plain-torch path: the one we compare with
    n, k = weight.shape
    lin = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(weight.float())
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    with contextlib.redirect_stdout(io.StringIO()):
        layer = HQQLinear(lin, cfg, compute_dtype=act_dtype, device=str(weight.device),
                          del_orig=True)
    stored = tensor_bytes(layer.W_q) + tensor_bytes(layer.meta)
    return {"layer": layer}, (lambda s: s["layer"](s["x"])), stored


def _gemlite(weight, bits, group_size, act_dtype):
    gemlite, _ = _quiet_import("gemlite")
    if act_dtype not in (torch.float16, torch.bfloat16):
        raise CannotRun(f"GemLite takes float16/bfloat16 activations, the run uses {act_dtype}")
    qw = qk.quantize_weight(weight.float(), bits, group_size, method="rtn")
    codes = qw.codes()[:, :qw.in_features].contiguous()          # [N, K] uint8
    scales = qw.scales.t().contiguous().to(act_dtype)              # [N, K/g]
    zeros = qw.zeros.t().contiguous().to(act_dtype)                # w = (q - z)·s, as ours
    layer = gemlite.helper.A16Wn(device=str(weight.device), dtype=act_dtype).from_weights(
        codes, scales, zeros, bits, group_size)
    return {"layer": layer}, (lambda s: s["layer"](s["x"])), tensor_bytes(layer)


# (name, package distribution, module to import, description, bits, devices, prepare, x dtype)
_PEERS = [
    ("torch_dense_fp32", "torch", None, "F.linear with a float32 weight", (), ("cpu", "cuda"),
     _dense(torch.float32), torch.float32),
    ("torch_dense_bf16", "torch", None, "F.linear with a bfloat16 weight (cuBLAS/oneDNN)", (),
     ("cpu", "cuda"), _dense(torch.bfloat16), torch.bfloat16),
    ("torch_int8pack", "torch", None, "torch._weight_int8pack_mm, int8 per-channel",
     (8,), ("cpu", "cuda"), _int8pack, None),
    ("torch_int4pack_cpu", "torch", None,
     "torch._weight_int4pack_mm_for_cpu, 4-bit asymmetric groups", (4,), ("cpu",),
     _int4pack_cpu, None),
    ("torch_int4pack_tinygemm", "torch", None,
     "torch._weight_int4pack_mm (tinygemm), 4-bit groups, bf16", (4,), ("cuda",),
     _int4pack_cuda, torch.bfloat16),
    ("bitsandbytes_nf4", "bitsandbytes", "bitsandbytes", "bitsandbytes matmul_4bit, NF4",
     (4,), ("cpu", "cuda"), _bnb_nf4, None),
    ("hqq_torch", "hqq", "hqq.core.quantize", "HQQLinear, HQQBackend.PYTORCH",
     (2, 3, 4, 8), ("cpu", "cuda"), _hqq, None),
    ("gemlite", "gemlite", "gemlite", "GemLite A16Wn (Triton), grouped INT", (2, 4, 8),
     ("cuda",), _gemlite, None),
]


def peer_impls(device: torch.device) -> Tuple[List[Impl], Dict[str, dict]]:
    """The peers, and a description of each (package version, whether it imports here,
    what it notes on import)."""
    impls, info = [], {}
    for name, dist, module, desc, bits, devices, prep, x_dtype in _PEERS:
        version = package_version(dist)
        note, unavailable = "", None
        if version is None:
            unavailable = f"{dist} is not installed"
        elif device.type not in devices:
            unavailable = f"runs on {'/'.join(devices)} only, not {device.type}"
        elif module is not None:
            try:
                _, note = _quiet_import(module)
            except Exception as e:  # noqa: BLE001 - an import failure is a result to report
                unavailable = f"import {module} failed: {_one_line(e)}"
        impls.append(Impl(name=name, family="peer", package=dist, description=desc,
                          bits=bits, devices=devices, _prepare=prep,
                          activation_dtype=x_dtype, unavailable=unavailable))
        info[name] = {"package": dist, "version": version, "installed": version is not None,
                      "description": desc, "usable_here": unavailable is None,
                      "unavailable_reason": unavailable, "import_note": note or None,
                      "could_not_run": []}
    return impls, info
