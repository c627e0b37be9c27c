"""Rewrite tests/slow_tests.txt from a timed run of the fast tests, so `make test-fast` stays fast.

    python -m pytest -m "not slow" --junitxml=/tmp/fast.xml
    python tests/measure_slow.py /tmp/fast.xml [--over 1.5]

Every test whose run took at least --over seconds is listed (by module and name, parameters dropped: one slow case
marks them all) with its time and the CPU it was measured on; tests/conftest.py marks them slow. Tests already in
the list keep their line, so a second run on a faster machine does not unmark them.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

LIST = Path(__file__).with_name("slow_tests.txt")
HEADER = """\
# Tests that `make test-fast` skips because one run took >= {over:g} s (written by tests/measure_slow.py; the
# categorical slow marks, browser, demo, bench..., are in tests/conftest.py). A line: module::test  seconds  CPU.
"""


def read_list(path: Path = LIST) -> dict[str, str]:
    """module::test -> the rest of its line (seconds and CPU)."""
    if not path.exists():
        return {}
    lines = (line.split(None, 1) for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#"))
    return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}


def measured(junit: Path) -> dict[str, float]:
    """module::test -> its longest case (setup, call and teardown) in a pytest --junitxml report."""
    times: dict[str, float] = {}
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1] + ".py"
        key = f"{module}::{case.get('name', '').split('[', 1)[0]}"
        times[key] = max(times.get(key, 0.0), float(case.get("time") or 0))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("junit", type=Path)
    parser.add_argument("--over", type=float, default=1.5, help="seconds from which a test is slow (1.5)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))  # run as a script, outside the venv's install
    from tunelab.hardware import cpu_info

    cpu = cpu_info().name
    kept = read_list()
    new = {key: f"{seconds:.1f} s  {cpu}" for key, seconds in measured(args.junit).items()
           if seconds >= args.over and key not in kept}
    rows = sorted({**kept, **new}.items())
    LIST.write_text(HEADER.format(over=args.over) + "".join(f"{k}  {v}\n" for k, v in rows), encoding="utf-8")
    print(f"{LIST}: {len(rows)} tests ({len(new)} new)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
