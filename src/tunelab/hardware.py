"""What the CPU is and which instructions it has, read once from /proc/cpuinfo (Linux; elsewhere: unknown)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# bf16 matmuls run ~3-4x faster than fp32 with one of these (docs/pitfalls.md #8); without, bf16 is slower than fp32
FAST_BF16_FLAGS = {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX"}


@dataclass(frozen=True)
class CpuInfo:
    name: str
    flags: frozenset[str]  # empty where the flags cannot be read

    @property
    def fast_bf16(self) -> bool:
        return any(flag in self.flags for flag in FAST_BF16_FLAGS)


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags in /proc/cpuinfo's format."""
    first = text.split("\n\n", 1)[0]
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    name = fields.get("model name") or platform.processor() or platform.machine()
    return CpuInfo(name, frozenset(fields.get("flags", "").split()))


@cache
def cpu_info() -> CpuInfo:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    except OSError:
        return CpuInfo(platform.processor() or platform.machine(), frozenset())


def bf16_features(flags) -> str:
    """Names exactly which of AVX-512 BF16 and AMX (its bf16 tiles) the CPU flags show."""
    found = [label for flag, label in FAST_BF16_FLAGS.items() if flag in flags]
    return "with " + " and ".join(found) if found else "no AVX-512 BF16 or AMX"
