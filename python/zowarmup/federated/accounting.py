"""Accounting of communication: bytes per client and round, up and down, per phase.

Bytes are counted by the round driver from the serialized messages themselves (see :mod:`.messages`
for the layouts); this module aggregates those counts into per-phase summaries. On-device memory
(by formula and measured) is in :mod:`zowarmup.memory`.
"""
from __future__ import annotations

import statistics

def phase_summary(records: list[dict]) -> dict:
    """Per-phase communication summary from metrics records.

    For each phase: rounds, the median per-round bytes up/down of a participating client (steady
    state), their maxima (the pivot round's one-off weights download shows in the max), and the
    phase's total bytes over all clients.
    """
    out: dict = {}
    for phase in dict.fromkeys(r["phase"] for r in records):
        rs = [r for r in records if r["phase"] == phase]
        out[phase] = {
            "rounds": len(rs),
            "bytes_up_per_client_median": statistics.median(r["bytes_up_per_client"] for r in rs),
            "bytes_down_per_client_median": statistics.median(r["bytes_down_per_client"] for r in rs),
            "bytes_up_per_client_max": max(r["bytes_up_per_client"] for r in rs),
            "bytes_down_per_client_max": max(r["bytes_down_per_client"] for r in rs),
            "bytes_up_total": int(sum(r["bytes_up_total"] for r in rs)),
            "bytes_down_total": int(sum(r["bytes_down_total"] for r in rs)),
        }
    return out


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
