"""Online loop benchmark (issue 19): env frames/s and updates/s of the trainer's own loop with MuJoCo Warp envs,
the per-step loop (frames written to a host buffer as they come) beside the GPU loop (``collector.inline_steps``
steps kept on the env's device, the buffer's rows on the device, no host read per step). Writes
docs/bench_online_loop.md (+ docs/bench_online_loop/results_<device>.json).

Each variant builds a fresh ``Trainer`` from ``train_agent.py``'s config (default: METRA from pixels, the paper
recipe's networks, batch 256, 8 envs, 0.125 updates per env step), fills the buffer past ``learning_starts``, then
times ``--steps`` loop iterations (each one env step of every env, and the updates it pays for) in blocks and
reports the medians. The time of each part is measured too, by wall clock around the policy step, the env step,
the buffer write and the updates, with ``torch.cuda.synchronize()`` at each boundary on CUDA (that is the
"profile" mode; the headline rate comes from a separate run without those synchronisations).

On the CPU (MuJoCo Warp through Warp's CPU backend) both variants do the same work and no host-device copy
exists, so the figures measure the staging's own cost, not its benefit; the GPU run is the one that matters:

    python scripts/bench_online_loop.py --device cuda --num-envs 64 --steps 300
    python scripts/bench_online_loop.py                 # CPU, small: a smoke check of the harness
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from latentrl.training.logger import processor_name, write_report_page

ROOT = Path(__file__).resolve().parents[1]
OUT_MD = ROOT / "docs" / "bench_online_loop.md"
OUT_DIR = ROOT / "docs" / "bench_online_loop"
# the per-step loop as before issue 19, and the GPU loop (the defaults with env.backend=mjwarp on CUDA)
VARIANTS = {"per_step": ["collector.inline_steps=1", "buffer_device=cpu"],
            "staged": ["collector.inline_steps=16", "buffer_device=auto"]}


def _config(args, variant: str, run_dir: Path):
    from latentrl.training.cli import _resolve_obs, load_config

    overrides = [
        f"agent={args.agent}", f"env={args.task}", "env.backend=mjwarp", f"device={args.device}",
        f"env.num_envs={args.num_envs}", f"updates_per_step={args.updates_per_step}",
        f"learning_starts={args.learning_starts}", f"buffer_capacity={args.buffer_capacity}",
        f"agent.preset={args.preset}", "log.progress=false", "log.tensorboard=false", "eval.every=0",
        "eval.at_end=false", "checkpoint_every=0", f"run_dir={run_dir}", f"threads={args.threads}",
        *args.override, *VARIANTS[variant],
    ]
    cfg = load_config(overrides)
    _resolve_obs(cfg)  # env.obs=auto: what the agent reads, as train_agent.py resolves it
    return cfg


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_variant(args, variant: str, profile: bool) -> dict:
    """One variant: a Trainer, ``learning_starts`` steps of warm-up, then ``args.steps`` timed loop steps."""
    from latentrl.training.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench_online_{variant}_"))
    trainer = Trainer(_config(args, variant, run_dir), run_dir)
    parts = {"policy": 0.0, "env": 0.0, "write": 0.0, "update": 0.0}
    if profile:  # wall clock per part, synchronised at each boundary
        policy_cls = type(trainer.agent.policy(explore=True))
        env_cls, trainer_cls = type(trainer.env), type(trainer)
        originals = {"policy": (policy_cls, "step"), "env": (env_cls, "step_and_maybe_reset"),
                     "write": (trainer_cls, "_flush_stage"), "update": (trainer_cls, "_update")}

        def timed(name, fn):
            def call(*a, **k):
                _sync(args.device)
                t0 = time.perf_counter()
                out = fn(*a, **k)
                _sync(args.device)
                parts[name] += time.perf_counter() - t0
                return out
            return call

        saved = {name: getattr(cls, attr) for name, (cls, attr) in originals.items()}
        for name, (cls, attr) in originals.items():
            setattr(cls, attr, timed(name, saved[name]))
    try:
        loop = trainer._online_steps()
        n = trainer.env.batch_size[0]
        while trainer.env_steps < args.learning_starts + 2 * n * 16:  # past learning_starts and the first writes
            next(loop)
        for key in parts:
            parts[key] = 0.0
        blocks, rates, updates0, steps0 = [], [], trainer.updates, trainer.env_steps
        started = time.perf_counter()
        for _ in range(max(1, args.steps // args.block)):
            _sync(args.device)
            t0, u0, s0 = time.perf_counter(), trainer.updates, trainer.env_steps
            for _ in range(args.block):
                next(loop)
            _sync(args.device)
            dt = time.perf_counter() - t0
            blocks.append(dt)
            rates.append(((trainer.env_steps - s0) / dt, (trainer.updates - u0) / dt))
        total = time.perf_counter() - started
        trainer._read_metrics()
        return {
            "variant": variant, "profile": profile, "inline_steps": trainer.inline_steps,
            "buffer_storage": str(trainer.buffer.storage_device or "cpu"),
            "frames_per_s": statistics.median(r[0] for r in rates),
            "updates_per_s": statistics.median(r[1] for r in rates),
            "env_steps": trainer.env_steps - steps0, "updates": trainer.updates - updates0, "seconds": total,
            "parts_s": dict(parts) if profile else None,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
        }
    finally:
        if profile:
            for name, (cls, attr) in originals.items():
                setattr(cls, attr, saved[name])
        trainer.env.close()
        if trainer.eval_env is not None:
            trainer.eval_env.close()
        shutil.rmtree(run_dir, ignore_errors=True)  # the trainer's run folder: nothing in it is reported


def _machine(device: str) -> dict:
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "device": device,
           "cpu": processor_name("cpu")}
    if Path("/proc/loadavg").exists():
        out["load"] = Path("/proc/loadavg").read_text().split()[:3]
    if device.startswith("cuda"):
        out["gpu"] = processor_name(device)
    return out


def write_page(results: list[dict], path: Path) -> None:
    lines = ["# Online loop: per-step vs staged (GPU loop)", "",
             "Written by `scripts/bench_online_loop.py` (its docstring says what is timed). Each results file is one "
             "run: the machine, the settings, then one row per variant; `profile` rows add the time of each part "
             "(synchronised at each boundary, so they run slower than the headline rows).", ""]
    for result in results:
        m, s = result["machine"], result["settings"]
        lines += [f"## {m['device']} — {m.get('gpu', m['cpu'])}, {m['date']}", "",
                  f"{s['agent']} on {s['task']} (preset {s['preset']}), {s['num_envs']} MuJoCo Warp envs, "
                  f"{s['updates_per_step']} updates per env step, {s['steps']} timed loop steps in blocks of "
                  f"{s['block']}; torch {m['torch']}, {s['threads']} threads"
                  + (f", load {' '.join(m['load'])}" if "load" in m else "") + ".", "",
                  "| variant | inline steps | buffer rows on | env frames/s | updates/s | policy s | env s | "
                  "write s | update s |", "|---|---|---|---|---|---|---|---|---|"]
        base = {r["variant"]: r for r in result["rows"] if not r["profile"]}
        for r in result["rows"]:
            p = r["parts_s"] or {}
            ratio = ""
            if not r["profile"] and r["variant"] != "per_step" and "per_step" in base:
                ratio = f" (x{r['frames_per_s'] / base['per_step']['frames_per_s']:.2f})"
            name = r["variant"] + (" (profile)" if r["profile"] else "")
            cells = [f"{p[k]:.2f}" if k in p else "" for k in ("policy", "env", "write", "update")]
            lines.append(f"| {name} | {r['inline_steps']} | {r['buffer_storage']} | {r['frames_per_s']:.0f}{ratio} | "
                         f"{r['updates_per_s']:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    write_report_page(path, "\n".join(lines))  # keeps the page's hand-written reading


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--agent", default="metra")
    p.add_argument("--task", default="cheetah-run")
    p.add_argument("--preset", default="paper")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--updates-per-step", type=float, default=0.125)
    p.add_argument("--learning-starts", type=int, default=256)
    p.add_argument("--buffer-capacity", type=int, default=20000)
    p.add_argument("--steps", type=int, default=64, help="timed loop steps (each: one step of every env)")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-profile", action="store_true", help="skip the per-part profile rows")
    p.add_argument("--override", nargs="*", default=[], help="more train_agent.py key=value settings")
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", nargs="*", default=None, help="only write the page from these results files")
    p.add_argument("--out", default=str(OUT_MD))
    args = p.parse_args(argv)
    if args.from_json is None:
        torch.set_num_threads(args.threads)
        rows = []
        for variant in args.variants:
            for profile in (False,) if args.no_profile else (False, True):
                row = run_variant(args, variant, profile)
                print(json.dumps(row), flush=True)
                rows.append(row)
        settings = {k: getattr(args, k) for k in ("agent", "task", "preset", "num_envs", "updates_per_step", "steps",
                                                  "block", "threads", "override")}
        result = {"machine": _machine(args.device), "settings": settings, "rows": rows}
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        json_path = Path(args.json or OUT_DIR / f"results_{args.device.split(':')[0]}.json")
        json_path.write_text(json.dumps(result, indent=1))
        files = [json_path]
    else:
        files = [Path(f) for f in args.from_json] or sorted(OUT_DIR.glob("results_*.json"))
    write_page([json.loads(f.read_text()) for f in files], Path(args.out))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
