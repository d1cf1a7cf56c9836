"""What serving costs the machine: CPU seconds of a process, encoder FLOPs, the CPU's fp32 peak.

- `cpu_seconds(pid)`: user + system time of a process, all its threads, from its own
  accounting (/proc/<pid>/stat), so a benchmark can charge each server what it used,
  whatever else shares the cores.
- `encoder_flops`: multiply-adds x 2 of a BERT encoder + pooler + head on one padded row.
- `fp32_peak`: the cores' fp32 FLOP/s from /proc/cpuinfo (vector width and FMA units per
  microarchitecture, times the reported clock), and how it was estimated.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (every thread) in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted from 1
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuWindow:
    """CPU seconds a process used between `start()` and `stop()`, and the wall time."""

    pid: int
    cpu_s: float = 0.0
    wall_s: float = 0.0
    _cpu0: float = 0.0
    _wall0: float = 0.0

    def start(self) -> None:
        self._cpu0, self._wall0 = cpu_seconds(self.pid), time.perf_counter()

    def stop(self) -> None:
        self.cpu_s += cpu_seconds(self.pid) - self._cpu0
        self.wall_s += time.perf_counter() - self._wall0


def encoder_flops(length: int, hidden: int, layers: int, intermediate: int, labels: int = 2) -> int:
    """FLOPs (2 per multiply-add) of one row of `length` tokens: QKV + output projections,
    attention scores and context, the feed-forward pair, then pooler and classifier."""
    per_layer = 8 * length * hidden * hidden + 4 * length * hidden * intermediate + 4 * length * length * hidden
    return layers * per_layer + 2 * hidden * hidden + 2 * hidden * labels


# fp32 FLOPs per cycle per core: 2 FMA pipes x lanes x 2. Zen 2-4 have two 256-bit FMA pipes
# (Zen 4 runs AVX-512 as two halves); Intel server cores with AVX-512 have two 512-bit FMA units.
def _flops_per_cycle(vendor: str, family: int, flags: set[str]) -> tuple[int, str]:
    if vendor == "AuthenticAMD" and family >= 0x17 and "fma" in flags:
        return 32, "AMD Zen 2-4: 2 FMA pipes x 8 fp32 lanes (256-bit) x 2"
    if "avx512f" in flags:
        return 64, "AVX-512 core, assumed 2 FMA units x 16 fp32 lanes x 2"
    if "fma" in flags and "avx2" in flags:
        return 32, "AVX2 + FMA: 2 FMA units x 8 fp32 lanes x 2"
    if "avx" in flags:
        return 16, "AVX without FMA: 8-lane add + 8-lane multiply"
    return 8, "SSE: 4-lane add + 4-lane multiply"


def fp32_peak(cores: int | None = None, cpuinfo: str | None = None) -> dict:
    """Estimated fp32 peak GFLOP/s of `cores` cores, and how it was estimated."""
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    first = text.split("\n\n")[0]

    def field(name: str) -> str:
        match = re.search(rf"^{name}\s*:\s*(.*)$", first, re.MULTILINE)
        return match.group(1).strip() if match else ""

    flags = set(field("flags").split())
    per_cycle, why = _flops_per_cycle(field("vendor_id"), int(field("cpu family") or 0), flags)
    mhz = float(field("cpu MHz") or 0.0)
    cores = cores or os.cpu_count() or 1
    return {
        "gflops": round(per_cycle * mhz / 1000 * cores, 1),
        "cores": cores,
        "mhz": mhz,
        "flops_per_cycle_per_core": per_cycle,
        "how": f"{why}; clock: 'cpu MHz' of /proc/cpuinfo (the nominal/TSC rate under a hypervisor, no boost)",
    }


def sgemm_gflops(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """What a large fp32 matrix product (numpy's BLAS) reaches here: a practical ceiling."""
    import numpy as np

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
