"""bench/train.py --isa avx2 without training: the environment it sets, that a fresh process started with it runs
ATen's AVX2 kernels (as the arm processes do), and the report's machine and kernel lines. The full bench with
--isa is run by hand (docs/speed.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_isa", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_avx2() -> bool:
    try:
        return "avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_isa_environment_limits_every_library(bench):
    env = bench.isa_environment("avx2")
    assert env == {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                   "TUNELAB_BENCH_ISA": "avx2"}
    assert bench.isa_environment(None) == {}
    args = bench.parse_args(["--isa", "avx2", "--precision", "fp32"])
    assert args.isa == "avx2" and args.no_gc and args.repeat == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--isa", "sse"])


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86 CPU with AVX2")
def test_a_process_started_with_it_runs_avx2_kernels(bench):
    """What an arm's process reports: bench/train.py's own kernels_in_use, run in a child with the --isa env."""
    code = (f"import importlib.util, json; s = importlib.util.spec_from_file_location('b', {str(BENCH)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(json.dumps(m.kernels_in_use('cpu')))")
    env = {**os.environ, **bench.isa_environment("avx2")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert kernels["aten_kernels"] == "AVX2"
    assert kernels["fp32_gflops"] > 0 and kernels["bf16_gflops"] > 0


def test_report_names_the_limit_and_the_arms_kernels(bench, monkeypatch):
    monkeypatch.setenv("TUNELAB_BENCH_ISA", "avx2")
    label = bench.machine("cpu")
    assert "limited with MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2" in label
    assert "not an AVX2-only CPU" in label and "flags:" in label
    monkeypatch.delenv("TUNELAB_BENCH_ISA")
    assert "limited with" not in bench.machine("cpu")
    rows = [{"arm": "plain", "aten_kernels": "AVX2", "fp32_gflops": 151.2, "bf16_gflops": 1.9},
            {"arm": "tunelab", "aten_kernels": "AVX2", "fp32_gflops": 139.0, "bf16_gflops": 2.2},
            {"arm": "trl_fast", "error": "exit 1"}]
    assert bench.kernels_line(rows) == ("Kernels in the arm processes (measured in each after training): ATen AVX2 "
                                        "in 2 arm(s), fp32 1024^2 matmul 140-150 GFLOP/s, bf16 256^2 2-2 GFLOP/s.")
    assert bench.kernels_line([{"arm": "plain", "error": "exit 1"}]) == ""


def test_matmul_peak_stops_growing_at_the_largest_size(bench):
    peak = bench.matmul_peak("cpu", largest=256)
    assert set(peak) == {"fp32", "bf16"} and all(v > 0 for v in peak.values())
