#!/usr/bin/env python
"""Control benchmark: per-agent policy latency at batch 1 (PyTorch eager, torch.export, onnxruntime) and
loop jitter on SimRobot at 50 and 100 Hz; writes docs/bench_control.md and docs/bench_control/.

``python scripts/bench_control.py [preset=paper] [calls=1000] [warmup=100] [loop_s=20] [out=docs]``

Protocol: B = 1, the carry fed back, 64 pooled observations cycled; ``warmup`` untimed calls then
``calls`` calls timed by ``perf_counter_ns``; one backend at a time. End to end: ``loop_s`` seconds of
the TD-JEPA reward policy driving SimRobot (reacher-easy, pixels 64) per rate and backend.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from latentrl.control.fake import DEMO_CASES as AGENTS
from latentrl.control.telemetry import step_latencies
from latentrl.training.logger import processor_name


def build(case: str, root: Path, preset: str) -> Path:
    from latentrl.control.fake import save_demo_model

    return save_demo_model(case, root, preset)


def time_policy(policy, calls: int, warmup: int, budget_ms: float) -> dict:
    out = step_latencies(policy, calls, warmup=warmup)
    return {"p50": float(np.percentile(out, 50)), "p90": float(np.percentile(out, 90)),
            "p99": float(np.percentile(out, 99)), "max": float(out.max()), "mean": float(out.mean()),
            "over_budget_pct": float(100 * (out > budget_ms).mean()), "calls": calls}


def bench_latency(root: Path, preset: str, calls: int, warmup: int) -> list[dict]:
    from latentrl import load_policy
    from latentrl.control.export import OnnxPolicy, PolicyNotExportableError, TorchExportPolicy, export_policy

    rows = []
    default_threads = torch.get_num_threads()  # eager runs on one thread (more threads stall on a shared CPU)
    for case in AGENTS:
        model = build(case, root, preset)
        policy = load_policy(model)
        preset_used = json.loads((model / "config.json").read_text()).get("preset")
        planner = case == "active_inference"  # about 0.5 s a call at the paper size: fewer calls
        n, w = (max(calls // 15, 20), max(warmup // 20, 3)) if planner else (calls, warmup)
        torch.set_num_threads(1)
        rows.append({"agent": case, "preset": preset_used, "backend": "eager", "threads": 1,
                     **time_policy(policy, n, w, 20.0)})
        print(rows[-1], flush=True)
        try:
            export_policy(model, formats=("onnx", "torch_export"))
        except PolicyNotExportableError as err:
            rows.append({"agent": case, "preset": preset_used, "backend": "not exportable", "threads": None,
                         "reason": str(err).split(":", 1)[1].split(". Run")[0].strip()})
            continue
        rows.append({"agent": case, "preset": preset_used, "backend": "torch.export (.pt2)", "threads": 1,
                     **time_policy(TorchExportPolicy(model / "export"), n, w, 20.0)})
        print(rows[-1], flush=True)
        for threads in (1, os.cpu_count() or 1):
            rows.append({"agent": case, "preset": preset_used, "backend": "onnxruntime", "threads": threads,
                         **time_policy(OnnxPolicy(model / "export", threads=threads), n, w, 20.0)})
            print(rows[-1], flush=True)
    torch.set_num_threads(default_threads)
    return rows


def bench_loop(root: Path, seconds: float) -> list[dict]:
    from latentrl import load_policy
    from latentrl.control.export import OnnxPolicy
    from latentrl.control.loop import ControlLoop, SafetyConfig
    from latentrl.control.sim import SimRobot

    model = root / "td_jepa_reward" / "model"
    torch.set_num_threads(1)
    rows = []
    for rate in (50.0, 100.0):
        robot = SimRobot("reacher-easy", image_size=64, rate_hz=rate, seed=0, action_timeout_s=1.0)
        robot.connect()
        try:
            for backend in ("eager", "onnxruntime"):
                robot.recover()
                policy = load_policy(model) if backend == "eager" else OnnxPolicy(model / "export", threads=1)
                loop = ControlLoop(robot, policy, rate, disconnect=False, safety=SafetyConfig(max_consecutive_faults=0))
                tel = loop.run(duration_s=seconds)
                s = tel.summary()
                late = tel.column("lateness_ms")[1:]
                rows.append({"rate_hz": rate, "backend": backend, "ticks": s["ticks"], "achieved_hz": s["achieved_hz"],
                             "lateness": s["lateness_ms"], "loop_latency": s["loop_latency_ms"],
                             "infer": s["infer_ms"], "sensor_to_actuation": s["sensor_to_actuation_ms"],
                             "obs_age": s["obs_age_ms"], "missed_ticks": s["missed_ticks"],
                             "deadline_misses": s["deadline_misses"], "faults": s["faults"],
                             "lateness_samples": late.tolist()})
                print({k: v for k, v in rows[-1].items() if k != "lateness_samples"}, flush=True)
            stats = robot.stats()
            rows[-1]["sim"] = {k: stats[k] for k in ("sim_time", "wall_time", "resyncs")}
        finally:
            robot.disconnect()
    return rows


def write_report(out: Path, latency: list[dict], loop: list[dict], header: dict) -> None:
    folder = out / "bench_control"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"header": header, "latency": latency, "loop": [
        {k: v for k, v in r.items() if k != "lateness_samples"} for r in loop]}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in loop:
            x = np.sort(np.asarray(r["lateness_samples"]))
            ax.plot(x, np.linspace(0, 1, len(x)), label=f"{r['rate_hz']:g} Hz, {r['backend']}")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("tick start lateness (ms)")
        ax.set_ylabel("fraction of ticks")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "lateness_cdf.png", dpi=120)
    except ImportError:
        pass
    lines = ["# Control benchmark: policy latency and loop jitter", "",
             "Made by `python scripts/bench_control.py` " + header["args"] + ". Raw numbers: "
             "[bench_control/results.json](bench_control/results.json).", "",
             f"- Machine: {header['cpu']}, {header['cores']} cores, load average at start {header['load_start']}, "
             f"at end {header['load_end']} ({header['load_note']})",
             f"- Versions: {header['versions']}; `OMP_NUM_THREADS={header['omp']}`; {header['date']}",
             "- GPU: none on this machine (CPU only).", "",
             "## Policy latency at batch 1", "",
             "One `step(obs, carry, is_first)` call on a 64x64 pixel observation with the carry fed back "
             "(frame stack and task vector / skill inside the carry); timed calls after warm-up, "
             "`perf_counter_ns`. Budget: the 50 Hz period (20 ms).", "",
             "| agent | preset | backend | threads | p50 ms | p99 ms | max ms | % > 20 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in latency:
        if r["backend"] == "not exportable":
            lines.append(f"| {r['agent']} | {r['preset']} | not exportable: {r['reason']} | | | | | |")
            continue
        lines.append(f"| {r['agent']} | {r['preset']} | {r['backend']} | {r['threads']} | {r['p50']:.3f} | "
                     f"{r['p99']:.3f} | {r['max']:.2f} | {r['over_budget_pct']:.1f} |")
    lines += ["", "## Loop jitter on SimRobot", "",
              "The TD-JEPA reward policy (pixels) driving SimRobot (reacher-easy, rendering 64x64 frames in its own "
              "process at the control rate) through `ControlLoop`, one thread for the policy. Lateness: tick start "
              "minus its scheduled time; loop latency: tick start to action sent; sensor to actuation: capture to "
              "action sent.", "",
              "| rate | backend | ticks | achieved Hz | lateness p50 / p99 ms | loop latency p50 / p99 ms | "
              "sensor->actuation p50 / p99 ms | missed ticks | deadline misses | stale obs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in loop:
        lines.append(
            f"| {r['rate_hz']:g} Hz | {r['backend']} | {r['ticks']} | {r['achieved_hz']:.2f} | "
            f"{r['lateness']['p50']:.2f} / {r['lateness']['p99']:.2f} | "
            f"{r['loop_latency']['p50']:.2f} / {r['loop_latency']['p99']:.2f} | "
            f"{r['sensor_to_actuation']['p50']:.2f} / {r['sensor_to_actuation']['p99']:.2f} | "
            f"{r['missed_ticks']} | {r['deadline_misses']} | {r['faults']['STALE_OBS']} |")
    lines += ["", "![lateness CDF](bench_control/lateness_cdf.png)", "", "## Reading the numbers", "",
              *header.get("notes", [])]
    (out / "bench_control.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    from latentrl.control.cli import parse_key_values

    spec = {"preset": ("paper", str, "agent preset (active_inference falls back to small where it has no paper)"),
            "calls": (1000, int, "timed calls per backend"), "warmup": (100, int, "untimed calls first"),
            "loop_s": (20.0, float, "seconds per rate and backend on SimRobot"),
            "out": ("docs", str, "where bench_control.md and bench_control/ go"),
            "notes": (None, str, "a JSON file with a list of lines for 'Reading the numbers'")}
    argv = sys.argv[1:] if argv is None else argv
    args = parse_key_values(argv, spec, "usage: python scripts/bench_control.py [key=value ...]")
    import onnxruntime

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        latency = bench_latency(root, args["preset"], args["calls"], args["warmup"])
        loop = bench_loop(root, args["loop_s"])
    load_end = os.getloadavg()
    cpu = processor_name("cpu")
    header = {
        "args": " ".join(argv) or "(defaults)", "cpu": cpu, "cores": os.cpu_count(),
        "load_start": " / ".join(f"{x:.1f}" for x in load_start), "load_end": " / ".join(f"{x:.1f}" for x in load_end),
        "load_note": "shared with other jobs: the machine was loaded" if load_start[0] > 0.5 * (os.cpu_count() or 1)
        else "idle",
        "versions": f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
                    f"python {platform.python_version()}",
        "omp": os.environ.get("OMP_NUM_THREADS", "unset"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "notes": json.loads(Path(args["notes"]).read_text()) if args["notes"] else [],
    }
    write_report(Path(args["out"]), latency, loop, header)
    print(f"wrote {Path(args['out']) / 'bench_control.md'}")


if __name__ == "__main__":
    main()
