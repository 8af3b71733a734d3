"""Per-tick timing and fault records of a control loop, their summary, and where they are written."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from enum import IntFlag
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

__all__ = ["Fault", "Telemetry", "step_latencies"]


def step_latencies(policy, calls: int, *, warmup: int = 5, obs_shape: Sequence[int] = (3, 64, 64),
                   obs_key: str = "pixels", seed: int = 0) -> np.ndarray:
    """Milliseconds of each of ``calls`` ``policy.step`` calls at batch 1, after ``warmup`` untimed ones,
    with the carry fed back: the latency a control loop waits on. Observations cycle through 64 random
    uint8 frames ``obs_shape`` (made before timing); the first call passes ``is_first``."""
    g = torch.Generator().manual_seed(seed)
    pool = [TensorDict({obs_key: torch.randint(0, 256, (1, *obs_shape), dtype=torch.uint8, generator=g)},
                       batch_size=[1]) for _ in range(64)]
    carry = policy.init_carry(1)
    first, not_first = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
    out = np.empty(calls)
    with torch.inference_mode():
        for i in range(warmup + calls):
            t = time.perf_counter_ns()
            _, carry = policy.step(pool[i % 64], carry, first if i == 0 else not_first)
            if i >= warmup:
                out[i - warmup] = (time.perf_counter_ns() - t) / 1e6
    return out


class Fault(IntFlag):
    """Why a tick sent a fallback instead of the policy's action (a bitmask per tick)."""

    OBS_ERROR = 1          # get_observation raised (disconnect, timeout, robot fault)
    BAD_OBS = 2            # wrong shape / dtype, NaN or inf in an observation the policy reads
    STALE_OBS = 4          # no new sample since the last tick (seq did not advance) or too old
    POLICY_ERROR = 8       # policy.step raised
    DEADLINE_MISS = 16     # the action was ready after the tick's deadline
    NONFINITE_ACTION = 32  # the policy returned NaN or inf
    ESTOP = 64             # the emergency stop is latched
    SEND_ERROR = 128       # send_action raised


_FLOAT_FIELDS = ("t_sched", "t_start", "t_obs", "t_infer", "t_sent", "obs_timestamp", "sleep_ms")
_INT_FIELDS = ("k", "obs_seq", "fault", "clipped", "rate_limited", "skipped", "episode")
FIELDS = ("k", "t_sched", "t_start", "t_obs", "t_infer", "t_sent", "obs_timestamp", "obs_seq", "sleep_ms", "fault",
          "clipped", "rate_limited", "skipped", "episode")
DERIVED = ("lateness_ms", "observe_ms", "infer_ms", "send_ms", "loop_latency_ms", "sensor_to_actuation_ms",
           "obs_age_ms")


class Telemetry:
    """Preallocated per-tick rows (grown by doubling outside the hot path when full), derived latencies
    in ms, a summary (tick 0 excluded: start-up), CSV / JSON files and TensorBoard scalars."""

    def __init__(self, rate_hz: float, deadline_s: float, capacity: int = 4096):
        self.rate_hz, self.deadline_s = float(rate_hz), float(deadline_s)
        self.n = 0
        self._cols: dict[str, np.ndarray] = {}
        self._alloc(max(int(capacity), 16))
        self.missed_ticks = 0
        self.estop_reason: str | None = None
        self.events: list[tuple[float, str]] = []

    def _alloc(self, capacity: int) -> None:
        old = self._cols
        self._cols = {f: np.full(capacity, np.nan) for f in _FLOAT_FIELDS}
        self._cols |= {f: np.zeros(capacity, dtype=np.int64) for f in _INT_FIELDS}
        for f, col in old.items():
            self._cols[f][: self.n] = col[: self.n]

    def add(self, **row) -> None:
        if self.n == len(self._cols["k"]):
            self._alloc(2 * self.n)
        i = self.n
        for f, v in row.items():
            self._cols[f][i] = v
        self.n += 1

    def log(self, t: float, message: str) -> None:
        """An event (a fault, an e-stop), kept with its time; the loop rate-limits what it prints."""
        self.events.append((t, message))

    def column(self, name: str) -> np.ndarray:
        """A recorded or derived column over the recorded ticks (derived ones in ms)."""
        c = {f: col[: self.n] for f, col in self._cols.items()}
        if name in c:
            return c[name]
        derived = {
            "lateness_ms": lambda: (c["t_start"] - c["t_sched"]) * 1e3,
            "observe_ms": lambda: (c["t_obs"] - c["t_start"]) * 1e3,
            "infer_ms": lambda: (c["t_infer"] - c["t_obs"]) * 1e3,
            "send_ms": lambda: (c["t_sent"] - c["t_infer"]) * 1e3,
            "loop_latency_ms": lambda: (c["t_sent"] - c["t_start"]) * 1e3,
            "sensor_to_actuation_ms": lambda: (c["t_sent"] - c["obs_timestamp"]) * 1e3,
            "obs_age_ms": lambda: (c["t_obs"] - c["obs_timestamp"]) * 1e3,
        }
        if name not in derived:
            raise KeyError(f"no telemetry column {name!r}; columns: {', '.join(FIELDS + DERIVED)}")
        return derived[name]()

    def fault_counts(self, rows: slice | None = None) -> dict[str, int]:
        fault = self.column("fault")[rows or slice(None)]
        return {f.name: int(((fault & int(f)) != 0).sum()) for f in Fault}

    def summary(self) -> dict:
        """p50 / p99 / max per stage (ms), achieved rate, misses and fault counts; tick 0 left out."""
        out: dict = {"ticks": self.n, "rate_hz": self.rate_hz, "deadline_ms": self.deadline_s * 1e3}
        rows = slice(1, None)
        for name in DERIVED:
            x = self.column(name)[rows]
            x = x[np.isfinite(x)]
            out[name] = ({"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)),
                          "max": float(x.max()), "mean": float(x.mean())} if x.size else None)
        starts = self.column("t_start")
        span = starts[-1] - starts[0] if self.n > 1 else math.nan
        out["achieved_hz"] = (self.n - 1) / span if self.n > 1 and span > 0 else math.nan
        out["missed_ticks"] = int(self.missed_ticks)
        out["faults"] = self.fault_counts()
        fault = self.column("fault")
        out["fault_ticks"] = int((fault != 0).sum())
        out["deadline_misses"] = out["faults"]["DEADLINE_MISS"]
        out["clipped_pct"] = 100.0 * float(self.column("clipped").mean()) if self.n else 0.0
        out["rate_limited_pct"] = 100.0 * float(self.column("rate_limited").mean()) if self.n else 0.0
        sleep = self.column("sleep_ms")[rows]
        sleep = sleep[np.isfinite(sleep)]
        out["mean_sleep_ms"] = float(sleep.mean()) if sleep.size else math.nan
        out["estop"] = self.estop_reason
        return out

    def write(self, folder: str | Path, logger=None) -> dict:
        """``telemetry.csv`` (one row per tick, derived columns included) and ``telemetry.json`` (summary
        and events) under ``folder``; scalars to a TensorBoard ``SummaryWriter`` when given."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = FIELDS + DERIVED
        cols = [self.column(n) for n in names]
        with open(folder / "telemetry.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            for i in range(self.n):
                writer.writerow([_fmt(c[i]) for c in cols])
        summary = self.summary()
        (folder / "telemetry.json").write_text(json.dumps(
            {"summary": _json_safe(summary), "events": [{"t": t, "event": e} for t, e in self.events]}, indent=2))
        if logger is not None:
            self.to_tensorboard(logger, summary)
        return summary

    def to_tensorboard(self, writer, summary: dict | None = None) -> None:
        """Per-tick latencies (``control/<name>``) and the summary (``control_summary/...``)."""
        summary = summary or self.summary()
        k = self.column("k")
        for name in ("loop_latency_ms", "infer_ms", "obs_age_ms", "lateness_ms"):
            x = self.column(name)
            for i in range(self.n):
                if np.isfinite(x[i]):
                    writer.add_scalar(f"control/{name}", float(x[i]), int(k[i]))
        fault = self.column("fault")
        for i in range(self.n):
            writer.add_scalar("control/fault", int(fault[i]), int(k[i]))
        for name in DERIVED:
            if summary.get(name):
                for q in ("p50", "p99"):
                    writer.add_scalar(f"control_summary/{name}_{q}", summary[name][q], 0)
        for fname, count in summary["faults"].items():
            writer.add_scalar(f"control_summary/fault_{fname}", count, 0)
        writer.add_scalar("control_summary/missed_ticks", summary["missed_ticks"], 0)
        writer.add_scalar("control_summary/achieved_hz", summary["achieved_hz"], 0)
        writer.flush()


def _fmt(x) -> str:
    if isinstance(x, (np.floating, float)):
        return "" if not np.isfinite(x) else f"{float(x):.9g}"
    return str(int(x))


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_summary(summary: dict) -> str:
    """The end-of-run table: one line per stage (p50 / p99 / max ms), then rates, misses and faults."""
    lines = [f"{'stage':<24}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"]
    for name in DERIVED:
        s = summary.get(name)
        if s:
            lines.append(f"{name.removesuffix('_ms'):<24}{s['p50']:>10.2f}{s['p99']:>10.2f}{s['max']:>10.2f}")
    lines.append(f"ticks {summary['ticks']}, achieved {summary['achieved_hz']:.2f} Hz of {summary['rate_hz']:g}, "
                 f"missed ticks {summary['missed_ticks']}, deadline misses {summary['deadline_misses']}, "
                 f"fault ticks {summary['fault_ticks']}, clipped {summary['clipped_pct']:.1f}%, "
                 f"rate-limited {summary['rate_limited_pct']:.1f}%, mean sleep {summary['mean_sleep_ms']:.2f} ms")
    faults = ", ".join(f"{k} {v}" for k, v in summary["faults"].items() if v)
    lines.append(f"faults: {faults or 'none'}" + (f"; e-stop: {summary['estop']}" if summary["estop"] else ""))
    return "\n".join(lines)
