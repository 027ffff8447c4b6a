"""What an allocation costs: bytes (from the packed format's formulas) and microseconds
(from a table of measured kernel timings).

Memory is never estimated: every figure comes from :func:`qra_kernels.format.packed_nbytes`
and :func:`qra_kernels.format.lora_nbytes`, the formulas the stored tensors obey, so it equals
``sum(QRALinear.memory_bytes())`` and ``Allocation.memory_bytes`` exactly (tested). With
``training=True`` the adapters' gradients and Adam's two moment buffers (fp32) are added.

Latency comes from a :class:`LatencyTable` — one JSON file per named device under
``qra_search/data/latency_<device>.json`` (or any path) holding measured microseconds per
(out_features, in_features, bits, rank, M); ranks between measured ones are interpolated
linearly. :func:`measure_latency_table` measures one on the spot through the public
``qra_kernels.qra_linear`` op, on whatever backend ``auto`` picks here.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from qra_kernels.format import lora_nbytes, packed_nbytes, padded_in_features

from qra_kernels.allocation import DTYPE_BYTES

Config = Mapping[str, Tuple[int, int]]
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


class CostModel:
    def __init__(self, shapes: Mapping[str, Tuple[int, int]], group_size: int = 64,
                 scale_dtype: str = "float16", lora_dtype: str = "float32",
                 training: bool = False, latency: Optional["LatencyTable"] = None,
                 latency_m: int = 1):
        self.shapes = {n: (int(s[0]), int(s[1])) for n, s in shapes.items()}
        self.group_size = group_size
        self.scale_bytes = DTYPE_BYTES[scale_dtype]
        self.lora_bytes = DTYPE_BYTES[lora_dtype]
        self.training = training
        self.latency, self.latency_m = latency, latency_m

    # --- memory --------------------------------------------------------------------------
    def layer_bytes(self, name: str, bits: int, rank: int) -> int:
        n, k = self.shapes[name]
        b = packed_nbytes(n, k, bits, self.group_size, self.scale_bytes)
        b += lora_nbytes(n, k, rank, self.lora_bytes)
        if self.training:  # gradient + Adam exp_avg + exp_avg_sq, all fp32
            b += 3 * lora_nbytes(n, k, rank, 4)
        return b

    def memory_bytes(self, config: Config) -> int:
        return sum(self.layer_bytes(n, b, r) for n, (b, r) in config.items())

    def uniform_bytes(self, bits: float, rank: int, names: Optional[Iterable[str]] = None) -> int:
        """Bytes of the layers stored uniformly at ``bits`` (fractional allowed: the codes
        scale linearly, scales and zeros do not) with adapters of ``rank``. Equal to
        :meth:`memory_bytes` of the uniform allocation for an integer supported ``bits``."""
        total = 0.0
        for name in (names if names is not None else self.shapes):
            n, k = self.shapes[name]
            kp = padded_in_features(k, self.group_size)
            total += n * kp * bits / 8 + 2 * self.scale_bytes * n * (kp // self.group_size)
            total += lora_nbytes(n, k, rank, self.lora_bytes)
            if self.training:
                total += 3 * lora_nbytes(n, k, rank, 4)
        return int(total)

    def bits_for_bytes(self, nbytes: float, rank: int) -> float:
        """The (fractional) uniform bit-width whose :meth:`uniform_bytes` equals ``nbytes``."""
        fixed = self.uniform_bytes(0.0, rank)
        per_bit = self.uniform_bytes(1.0, rank) - fixed
        return (nbytes - fixed) / per_bit

    # --- latency -------------------------------------------------------------------------
    def latency_us(self, config: Config) -> Optional[float]:
        if self.latency is None:
            return None
        return sum(self.latency.lookup(*self.shapes[n], b, r, self.latency_m)
                   for n, (b, r) in config.items())


class LatencyTable:
    """Measured microseconds per (N, K, bits, rank, M) on one named device."""

    def __init__(self, device: str, entries: Sequence[dict], meta: Optional[dict] = None):
        self.device, self.meta = device, dict(meta or {})
        self._t: Dict[Tuple[int, int, int, int], Dict[int, float]] = {}
        for e in entries:
            try:
                key = (int(e["n"]), int(e["k"]), int(e["bits"]), int(e["m"]))
                self._t.setdefault(key, {})[int(e["rank"])] = float(e["us"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"latency table entry {e!r} needs n, k, bits, rank, m, us") from None

    @property
    def entries(self):
        return [{"n": n, "k": k, "bits": b, "m": m, "rank": r, "us": us}
                for (n, k, b, m), ranks in sorted(self._t.items()) for r, us in sorted(ranks.items())]

    def lookup(self, n: int, k: int, bits: int, rank: int, m: int) -> float:
        ranks = self._t.get((n, k, bits, m))
        if not ranks:
            raise ValueError(
                f"latency table for device {self.device!r} has no timing for shape {n}x{k}, "
                f"bits={bits}, M={m}; measure one with `qra search --latency-table measure`")
        if rank in ranks:
            return ranks[rank]
        rs = sorted(ranks)
        lo = max([r for r in rs if r <= rank], default=rs[0])
        hi = min([r for r in rs if r >= rank], default=rs[-1])
        if lo == hi:  # outside the measured range: extrapolate from the two nearest
            if len(rs) < 2:
                return ranks[lo]
            lo, hi = (rs[0], rs[1]) if rank < rs[0] else (rs[-2], rs[-1])
        t = (rank - lo) / (hi - lo)
        return ranks[lo] + t * (ranks[hi] - ranks[lo])

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"device": self.device, "meta": self.meta, "entries": self.entries}, f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path_or_device: str) -> "LatencyTable":
        path = path_or_device
        if not os.path.exists(path):
            path = os.path.join(DATA_DIR, f"latency_{path_or_device}.json")
        if not os.path.exists(path):
            shipped = sorted(f[8:-5] for f in os.listdir(DATA_DIR) if f.startswith("latency_")) \
                if os.path.isdir(DATA_DIR) else []
            raise ValueError(f"no latency table {path_or_device!r}: give a JSON path or one of "
                             f"the shipped devices {shipped}")
        try:
            with open(path) as f:
                d = json.load(f)
            return cls(d["device"], d["entries"], d.get("meta"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a latency table ({e})") from None


def measure_latency_table(shapes: Iterable[Tuple[int, int]], bits: Sequence[int],
                          ranks: Sequence[int], m: int = 1, device: str = "cpu",
                          group_size: int = 64, repeats: int = 20,
                          progress: bool = False) -> LatencyTable:
    """Time ``qra_kernels.qra_linear`` (median of ``repeats`` after a warm-up) for every
    distinct shape, bit-width and rank, at ``m`` rows of input, on ``device``."""
    import torch
    import qra_kernels as qk
    shapes = sorted(set((int(n), int(k)) for n, k in shapes))
    combos = [(n, k, b, r) for n, k in shapes for b in bits for r in ranks]
    it = combos
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(combos, desc="measuring latency", unit="config")
    gen = torch.Generator().manual_seed(0)
    entries, cache = [], {}
    for n, k, b, r in it:
        if (n, k, b) not in cache:
            w = torch.randn(n, k, generator=gen)
            cache[(n, k, b)] = qk.quantize_weight(w, b, group_size, "rtn", pad=k % group_size != 0)
        qw = cache[(n, k, b)]
        qw = type(qw)(qw.qweight.to(device), qw.scales.to(device), qw.zeros.to(device), b,
                      group_size, qw.shape)
        x = torch.randn(m, k, generator=gen).to(device)
        A = torch.randn(r, k, generator=gen).to(device) if r else None
        B = torch.randn(n, r, generator=gen).to(device) if r else None
        times = []
        with torch.no_grad():
            for i in range(repeats + 2):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                qk.qra_linear(x, qw, A, B, 1.0)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        times.sort()
        entries.append({"n": n, "k": k, "bits": b, "rank": r, "m": m,
                        "us": times[len(times) // 2] * 1e6})
    meta = {"group_size": group_size, "repeats": repeats, "backend": "auto",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return LatencyTable(device, entries, meta)
