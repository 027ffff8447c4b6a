"""The machine description and its hardware limit (measured copy bandwidth).

Every bandwidth figure the benchmarks report is "bytes the operation must read ÷ time",
divided by the copy bandwidth measured here on the same machine in the same process, so
the fraction says how close a kernel comes to what the memory system can deliver.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from typing import Dict, Optional

import torch

__all__ = ["describe", "last_level_cache_bytes", "gpu_l2_bytes", "copy_bandwidth"]


def _lscpu() -> Dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache, from sysfs (32 MiB assumed if unreadable)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
                best = max(best, int(m.group(1)) * mult)
    except OSError:
        pass
    return best or 32 << 20


def gpu_l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size as the driver reports it (50 MiB, an H100's, if it does not)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or (50 << 20))


def _mem_total_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s+(\d+) kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _nvidia_smi(device_index: int) -> Dict[str, str]:
    """Clocks and driver as nvidia-smi reports them (empty when it is missing)."""
    fields = ["driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.limit", "persistence_mode", "clocks_throttle_reasons.active"]
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device_index}",
                              f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    values = [v.strip() for v in out.stdout.strip().split(",")]
    return dict(zip(fields, values)) if len(values) == len(fields) else {"raw": out.stdout}


def describe(device: torch.device) -> dict:
    """What a reader needs to compare these numbers with theirs."""
    import qra_kernels
    cpu = _lscpu()
    desc = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "memory_bytes": _mem_total_bytes(),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "qra": qra_kernels.build_info(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        desc["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "cuda_runtime": torch.version.cuda,
            **_nvidia_smi(device.index or 0),
        }
    return desc


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """Measured device-copy bandwidth: ``dst.copy_(src)`` of ``nbytes``, counted as
    ``2 * nbytes`` moved (read + write) per copy — the convention of STREAM's "Copy" and of
    the CUDA bandwidth samples. Best of ``repeats`` (the limit is what the hardware *can*
    do). On a GPU the copies are replayed from a CUDA graph and timed with events."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    times = []
    if device.type == "cuda":
        inner = 10
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            dst.copy_(src)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(inner):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        method = f"CUDA graph of {inner} device copies of {nbytes >> 20} MiB, best of {repeats}"
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        method = (f"torch copy_ of {nbytes >> 20} MiB with {torch.get_num_threads()} threads, "
                  f"best of {repeats}")
    best = min(times)
    return {
        "copy_bandwidth_GBps": 2 * nbytes / best / 1e9,
        "median_copy_bandwidth_GBps": 2 * nbytes / sorted(times)[len(times) // 2] / 1e9,
        "bytes_per_copy": nbytes,
        "counted_as": "read + write (2 x bytes per copy)",
        "method": method,
    }
