"""bench/serve_load.py keeps working on a tiny model: the batching comparison (streaming, batching off capped at a
level) and the reused-vs-fresh generation thread comparison. No timing is checked here; the figures come from
running the bench itself (README, Serving)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"


def run_bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and line[2].isdigit()]


def test_compare_batching_streams_and_caps_the_batching_off_levels(tiny_llama):
    out = run_bench("--model", str(tiny_llama), "--clients", "1,3", "--requests-per-client", "1", "--min-requests",
                    "1", "--max-tokens", "4", "--stream", "--compare-batching", "--max-batch-size", "4",
                    "--threads", "1", "--off-max-clients", "1")
    on, off = out.split("batching off")
    assert [r[0] for r in table_rows(on)] == ["1", "3"] and [r[0] for r in table_rows(off)] == ["1"]
    for row in table_rows(out):
        assert row[10] == "0" and float(row[3]) > 0 and row[6] != "nan"  # no errors, tokens, a first-token time
    assert "first-token p95 at 3 clients" in on  # the target, checked against the 1-client level


def test_compare_threads_reports_both_generation_threads(tiny_llama):
    out = run_bench("--model", str(tiny_llama), "--compare-threads", "--threads", "1", "--min-requests", "2",
                    "--max-tokens", "4")
    assert "identical answers: True" in out
    rows = [line for line in out.splitlines() if line.startswith(("| reused", "| fresh"))]
    assert len(rows) == 2 and all(float(r.split("|")[3]) > 0 for r in rows)
