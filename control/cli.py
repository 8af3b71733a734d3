"""``run_control_loop.py`` and ``export_policy.py``: ``key=value`` arguments, like the other scripts."""

from __future__ import annotations

import difflib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["export_main", "parse_key_values", "run_main"]


class UsageError(ValueError):
    """A bad command line; the message says what to write instead."""


def _convert(value: str, kind: type, key: str) -> Any:
    if value.lower() in ("null", "none", ""):
        return None
    try:
        if kind is bool:
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        return kind(value)
    except ValueError:
        raise UsageError(f"{key}={value}: expected a {kind.__name__}") from None


def parse_key_values(argv: list[str], spec: dict[str, tuple[Any, type, str]], usage: str) -> dict[str, Any]:
    """``["model=runs/x/model", "rate=50"]`` -> values by key, typed by ``spec`` (``key: (default, type, help)``);
    ``--help`` prints the keys; an unknown key names the closest valid ones."""
    if any(a in ("-h", "--help") for a in argv):
        lines = [usage, "", "keys:"] + [f"  {k}={'' if d is None else d!s:<14} {h}" for k, (d, _, h) in spec.items()]
        print("\n".join(lines))
        raise SystemExit(0)
    out = {k: d for k, (d, _, _) in spec.items()}
    for arg in argv:
        if "=" not in arg:
            raise UsageError(f"arguments are key=value, got {arg!r}; {usage}")
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if key not in spec:
            close = difflib.get_close_matches(key, spec, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown key {key!r}.{hint} Valid keys: {', '.join(spec)}")
        out[key] = _convert(value, spec[key][1], key)
    return out


RUN_KEYS: dict[str, tuple[Any, type, str]] = {
    "model": (None, str, "model directory (<run>/model) to drive the robot with"),
    "robot": ("sim", str, "sim: a SimRobot (other drivers plug in through latentrl.control.Robot)"),
    "task": (None, str, "SimRobot task (default: the task the model was trained on)"),
    "rate": (None, float, "control rate in Hz (default: the task's training rate, 1 / (control_timestep x repeat))"),
    "duration": (60.0, float, "seconds to run"),
    "backend": ("torch", str, "torch (the Policy in-process) | onnx | torch_export (from <model>/export)"),
    "threads": (1, int, "torch / onnxruntime threads for the policy"),
    "image_size": (None, int, "camera frame size (default: the model's)"),
    "episode_ticks": (1000, int, "ticks per episode (SimRobot resets, the policy restarts); null: one episode"),
    "obs_ms": (0.0, float, "SimRobot observation latency (ms)"),
    "obs_jitter_ms": (0.0, float, "SimRobot observation latency jitter (ms, uniform)"),
    "obs_drop": (0.0, float, "probability that an observation never arrives"),
    "action_ms": (0.0, float, "SimRobot action latency (ms)"),
    "action_drop": (0.0, float, "probability that an action is lost"),
    "max_delta": (None, float, "largest change of an action element per tick (null: no rate limit)"),
    "fallback": (None, str, "zero | hold (default: the robot's preference)"),
    "deadline_ms": (None, float, "the action must be ready this long after a tick starts (default 0.8 period)"),
    "record": (None, str, "save every step as a replay dataset here (train_agent.py data=<this>)"),
    "out": (None, str, "folder for telemetry.csv / .json and TensorBoard (default runs/control/<time>)"),
    "tensorboard": (True, bool, "write TensorBoard scalars to <out>/tb"),
    "seed": (0, int, "SimRobot seed (initial states, latency draws)"),
    "status": (True, bool, "print a live status line"),
}

RUN_USAGE = ("usage: python scripts/run_control_loop.py model=<model dir> robot=sim task=<task> rate=50 duration=60 "
             "[key=value ...]")


def _training_rate(task: str, action_repeat: int) -> float:
    from latentrl.control.sim import _probe

    return 1.0 / (_probe(task)["control_timestep"] * max(int(action_repeat or 1), 1))


def _status_line(tel, k: int) -> None:
    import numpy as np

    n = tel.n
    lat = tel.column("loop_latency_ms")[max(1, n - 200):n]
    lat = lat[np.isfinite(lat)]
    p99 = float(np.percentile(lat, 99)) if lat.size else math.nan
    starts = tel.column("t_start")
    hz = (n - 1) / (starts[-1] - starts[0]) if n > 1 and starts[-1] > starts[0] else math.nan
    faults = int((tel.column("fault") != 0).sum())
    sys.stderr.write(f"\r[control] tick {k:6d}  {hz:6.2f} Hz  loop p99 {p99:6.2f} ms  missed {tel.missed_ticks:4d}  "
                     f"fault ticks {faults:5d}   ")
    sys.stderr.flush()


def run_main(argv: list[str] | None = None) -> dict:
    """``run_control_loop.py``: a model directory driving a robot; returns the telemetry summary."""
    args = parse_key_values(sys.argv[1:] if argv is None else argv, RUN_KEYS, RUN_USAGE)
    import torch

    from latentrl.agents.model_files import read_model_config
    from latentrl.control.loop import ControlLoop, SafetyConfig
    from latentrl.control.telemetry import format_summary

    if not args["model"]:
        raise UsageError(f"give model=<model dir>; {RUN_USAGE}")
    if args["robot"] != "sim":
        raise UsageError(f"robot={args['robot']}: only robot=sim ships; a hardware driver implements "
                         "latentrl.control.Robot and is passed to ControlLoop from Python")
    if args["backend"] not in ("torch", "onnx", "torch_export"):
        raise UsageError(f"backend={args['backend']}: use torch, onnx or torch_export")
    torch.set_num_threads(max(1, args["threads"]))
    model_dir = Path(args["model"])
    config = read_model_config(model_dir)
    env = config.get("env") or {}
    task = args["task"] or env.get("task")
    if not task:
        raise UsageError(f"{model_dir}/config.json names no task; give task=<task>")
    rate = args["rate"] or _training_rate(task, env.get("action_repeat", 1))
    obs_key = (config.get("config") or {}).get("obs_type", "pixels")
    image_size = args["image_size"] or (int(env.get("image_size") or 64) if obs_key == "pixels" else 0)
    if args["backend"] == "torch":
        from latentrl import load_policy

        policy = load_policy(model_dir)
    else:
        from latentrl.control.export import load_exported

        folder = model_dir / "export"
        if not (folder / "export.json").exists():
            raise UsageError(f"backend={args['backend']} needs {folder}/export.json: run scripts/export_policy.py "
                             f"model={model_dir} format={args['backend']} first")
        policy = load_exported(folder, args["backend"], threads=args["threads"])
    from latentrl.control.recorder import Recorder
    from latentrl.control.sim import LatencyModel, SimRobot

    latency = LatencyModel(obs_ms=args["obs_ms"], obs_jitter_ms=args["obs_jitter_ms"], action_ms=args["action_ms"],
                           obs_drop_prob=args["obs_drop"], action_drop_prob=args["action_drop"])
    robot = SimRobot(task, image_size=image_size, camera=env.get("camera"), rate_hz=rate, latency=latency,
                     seed=args["seed"])
    want = tuple(config["obs_shape"])
    have = robot.observation_features.get(obs_key)
    if have is None or tuple(have.shape) != want:
        raise UsageError(f"the model reads {obs_key} of shape {list(want)} but {robot.name} gives "
                         f"{None if have is None else list(have.shape)}; give a task / image_size of the model's "
                         "domain")
    out = Path(args["out"] or f"runs/control/{time.strftime('%Y%m%d-%H%M%S')}")
    logger = None
    if args["tensorboard"]:
        from torch.utils.tensorboard import SummaryWriter

        logger = SummaryWriter(str(out / "tb"))
    recorder = None
    if args["record"]:
        recorder = Recorder(args["record"], capacity=int(args["duration"] * rate * 1.1) + 1000,
                            domain=task.split("-", 1)[0])
    safety = SafetyConfig(max_delta=args["max_delta"], fallback=args["fallback"])
    loop = ControlLoop(robot, policy, rate, safety=safety, recorder=recorder, out_dir=out, logger=logger,
                       deadline_s=None if args["deadline_ms"] is None else args["deadline_ms"] / 1e3,
                       on_status=_status_line if args["status"] else None)
    print(f"[control] {config['agent']} ({args['backend']}) on {robot.name} at {rate:g} Hz for {args['duration']:g} s; "
          f"telemetry -> {out}" + (f"; dataset -> {args['record']}" if args["record"] else ""))
    tel = loop.run(duration_s=args["duration"], episode_ticks=args["episode_ticks"])
    if logger is not None:
        logger.close()
    summary = tel.summary()
    if args["status"]:
        sys.stderr.write("\n")
    print(format_summary(summary))
    stats = robot.stats()
    if stats:
        print(f"robot: sim {stats['sim_time']:.2f} s in {stats['wall_time']:.2f} s wall, re-syncs {stats['resyncs']}")
    return summary


EXPORT_KEYS: dict[str, tuple[Any, type, str]] = {
    "model": (None, str, "model directory (<run>/model)"),
    "format": ("onnx", str, "onnx | torch_export | onnx,torch_export"),
    "out": (None, str, "output folder (default <model>/export)"),
    "check": (True, bool, "compare the exported policy with PyTorch over a short closed loop"),
}
EXPORT_USAGE = "usage: python scripts/export_policy.py model=<model dir> format=onnx [out=<dir>] [check=true]"


def export_main(argv: list[str] | None = None) -> dict:
    """``export_policy.py``: write ``<model>/export/{policy.onnx, policy.pt2, export.json}``."""
    args = parse_key_values(sys.argv[1:] if argv is None else argv, EXPORT_KEYS, EXPORT_USAGE)
    if not args["model"]:
        raise UsageError(f"give model=<model dir>; {EXPORT_USAGE}")
    formats = tuple("torch_export" if f.strip() == "pt2" else f.strip() for f in args["format"].split(",") if f.strip())
    from latentrl.agents.model_files import read_model_config
    from latentrl.control.export import PolicyNotExportableError, export_policy

    model_dir = Path(args["model"])
    config = read_model_config(model_dir)
    env = config.get("env") or {}
    rate = None
    if env.get("task"):
        try:
            rate = _training_rate(env["task"], env.get("action_repeat", 1))
        except ValueError:
            rate = None
    try:
        meta = export_policy(model_dir, args["out"], formats=formats, rate_hz=rate, model_config=config)
    except PolicyNotExportableError as err:
        print(f"[export] {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args["out"] or model_dir / "export")
    print(f"[export] {config['agent']}: {', '.join(meta['files'].values())} -> {out}")
    print(f"[export] inputs  {[i['name'] for i in meta['inputs']]}")
    print(f"[export] outputs {[o['name'] for o in meta['outputs']]}")
    if args["check"]:
        from latentrl import load_policy
        from latentrl.control.export import load_exported, parity_check

        policy = load_policy(model_dir)
        for backend in meta["files"]:
            err = parity_check(policy, load_exported(out, backend), meta, steps=50)
            print(f"[export] {backend}: max |action - PyTorch| over 50 steps = {err['action']:.2e}, "
                  f"carry {err['carry']:.2e}")
            meta.setdefault("check", {})[backend] = err
        (out / "export.json").write_text(json.dumps(meta, indent=2))
    return meta
