"""The serving benchmark's accounting: CPU seconds from /proc, encoder FLOPs, the fp32 peak estimate."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.accounting import CpuWindow, cpu_seconds, encoder_flops, fp32_peak

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512bw

processor\t: 1
"""


def _busy(seconds: float) -> None:
    """Spin this thread for `seconds` of its own CPU time (process time also counts other threads of
    the test process, which made the wall clock of the spin shorter than `seconds` under load)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_seconds_counts_this_process_work() -> None:
    before = cpu_seconds(os.getpid())
    _busy(0.3)
    assert 0.2 <= cpu_seconds(os.getpid()) - before <= 1.0


def test_cpu_window_charges_another_process_only_its_own_time() -> None:
    # the child says when its interpreter has started (startup costs ~0.1 s of CPU), then sleeps
    script = "import sys, time; print('ready', flush=True); time.sleep(2)"
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            window = CpuWindow(child.pid)
            window.start()
            _busy(0.3)  # our work, not the child's
            window.stop()
        finally:
            child.kill()
    assert window.cpu_s < 0.1 and window.wall_s >= 0.3


def test_encoder_flops_of_a_known_shape() -> None:
    # 1 layer, hidden 2, intermediate 4, 3 tokens: 8*3*4 + 4*3*2*4 + 4*9*2 = 96 + 96 + 72; pooler 8, head 8
    assert encoder_flops(3, hidden=2, layers=1, intermediate=4, labels=2) == 96 + 96 + 72 + 8 + 8
    # MiniLM-L6 (hidden 384, intermediate 1536) on a 25-token row: ~0.53 GFLOP
    assert encoder_flops(25, 384, 6, 1536) == pytest.approx(0.53e9, rel=0.02)


def test_fp32_peak_from_cpuinfo() -> None:
    peak = fp32_peak(cores=2, cpuinfo=ZEN4)
    assert peak["flops_per_cycle_per_core"] == 32  # Zen 4: AVX-512 on two 256-bit FMA pipes
    assert peak["gflops"] == pytest.approx(32 * 2.6 * 2)
    assert "Zen" in peak["how"] and "cpu MHz" in peak["how"]
    intel = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("cpu family\t: 25", "cpu family\t: 6")
    assert fp32_peak(cores=1, cpuinfo=intel)["flops_per_cycle_per_core"] == 64
