#!/usr/bin/env python
"""Benchmark: data-parallel learners (``torchrun``, training/distributed.py) with 1 and N processes.

Runs the real entry point, ``scripts/train_agent.py``, once per process count (plain ``python`` for 1,
``torchrun --nproc_per_node N`` otherwise), each process with one torch thread, and reads the rates the
trainer logs to ``metrics.csv``:

- offline: TD-JEPA (``smoke`` networks, ``--batch-size`` global rows per update) on a small walker dataset
  collected first: updates/s of the job (each update is one step on the whole global batch);
- online: METRA (``smoke``: 64x64 pixels, rendered every frame, conv encoders) on walker-walk, every process
  with its own env: env frames/s of the job (all ranks' frames) and the updates/s that come with them
  (``updates_per_step`` 0.5 of the job's frames).

The load average is read before and after each run: on a shared machine it says how much of the CPU the
runs had. Writes a markdown report (``docs/bench_scaling.md`` by default) and prints it.

    python scripts/bench_scaling.py            # ~3-5 minutes on 2 cores
    python scripts/bench_scaling.py --quick    # ~1-2 minutes
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["preset=smoke", "log.progress=false", "log.tensorboard=false", "eval.every=0", "eval.at_end=false",
          "eval.video=false", "threads=1", "checkpoint_every=0"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--updates", type=int, default=400, help="offline updates per run")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch of the offline runs")
    parser.add_argument("--env-steps", type=int, default=2000, help="online env frames per run (all ranks)")
    parser.add_argument("--dataset-steps", type=int, default=1000, help="env steps of the offline dataset")
    parser.add_argument("--collectors", nargs="*", default=["inline", "sync", "multisync"],
                        help="collection engines to compare online on one process (collector.kind; none: skip)")
    parser.add_argument("--quick", action="store_true", help="~1-2 minute run: fewer updates and frames")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_scaling.md", help="markdown report")
    args = parser.parse_args(argv)
    if args.quick:
        args.updates, args.env_steps, args.dataset_steps = 120, 800, 400
    if any(n < 1 for n in args.nproc):
        parser.error("--nproc takes process counts >= 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, overrides: list[str], run_dir: Path) -> tuple[dict, float, tuple, tuple]:
    """Run train_agent.py on ``nproc`` processes; returns (last metrics.csv row, wall s, load before, after)."""
    script = [str(REPO / "scripts" / "train_agent.py"), *COMMON, *overrides, f"run_dir={run_dir}"]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    with open(run_dir / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("updates")]
    return rows[-1], wall, load_before, load_after


def collect_dataset(out: Path, steps: int) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "collect_dataset.py"), *COMMON, "env.obs=[state,physics]",
           f"steps={steps}", f"out={out}", f"run_dir={out.parent / 'collect'}"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"collecting the dataset failed:\n{done.stderr[-3000:]}")


def machine() -> str:
    try:
        from latentrl.training.logger import machine_description

        return machine_description()
    except (ImportError, OSError):
        return f"{os.cpu_count()} CPUs"


def measure(args: argparse.Namespace) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "walker"
        collect_dataset(data, args.dataset_steps)
        for nproc in args.nproc:
            row, wall, before, after = launch(nproc, [
                "agent=td_jepa", f"data={data}", "env.obs=[state,physics]", f"agent.batch_size={args.batch_size}",
                f"steps={args.updates}", f"log.every={args.updates}"], tmp / f"offline-{nproc}")
            results.append({"mode": "offline", "agent": "td_jepa", "nproc": nproc, "updates_per_s":
                            float(row["updates_per_s"]), "frames_per_s": None, "wall_s": wall,
                            "load": (before[0], after[0])})
            print(f"offline td_jepa x{nproc}: {results[-1]['updates_per_s']:.1f} updates/s", flush=True)
        for nproc in args.nproc:
            learning_starts = args.env_steps // 4
            row, wall, before, after = launch(nproc, [
                "agent=metra", f"steps={args.env_steps}", f"learning_starts={learning_starts}",
                "updates_per_step=0.5", f"log.every={args.env_steps}"], tmp / f"online-{nproc}")
            frames_per_s = float(row["env_steps_per_s"])
            seconds = float(row["env_steps"]) / frames_per_s
            results.append({"mode": "online", "agent": "metra", "nproc": nproc, "frames_per_s": frames_per_s,
                            "updates_per_s": float(row["updates"]) / seconds, "wall_s": wall,
                            "load": (before[0], after[0])})
            print(f"online metra x{nproc}: {frames_per_s:.0f} env frames/s", flush=True)
        for kind in args.collectors:  # one process, 2 envs in all: the trainer's loop against TorchRL's collectors
            envs = ["env.num_envs=1", "collector.workers=2"] if kind == "multisync" else ["env.num_envs=2"]
            row, wall, before, after = launch(1, [
                "agent=metra", f"steps={args.env_steps}", f"learning_starts={args.env_steps // 4}",
                "updates_per_step=0.5", f"log.every={args.env_steps}", "env.num_workers=0", f"collector.kind={kind}",
                "collector.steps_per_batch=25", *envs], tmp / f"collector-{kind}")
            frames_per_s = float(row["env_steps_per_s"])
            results.append({"mode": f"online, collector.kind={kind}", "agent": "metra", "nproc": 1,
                            "frames_per_s": frames_per_s, "updates_per_s": float(row["updates"]) * frames_per_s
                            / float(row["env_steps"]), "wall_s": wall, "load": (before[0], after[0])})
            print(f"online metra collector={kind}: {frames_per_s:.0f} env frames/s", flush=True)
    return results


GUARANTEES = """\
## Several GPUs, several nodes

No GPU was lent to this session, and these machines have one GPU at most, so the multi-GPU and multi-node
behaviour is described from what the tests show on the CPU and from what torch.distributed guarantees:

- **Same update as one process.** `tests/test_distributed.py` runs 2 gloo processes, each on half of the global
  batch, against one process on the whole batch (random draws made identical per global row): after 6 updates
  every parameter, EMA target, normaliser statistic and Adam moment of TD-JEPA, METRA and FB agrees within 1e-5,
  and the two ranks are bitwise identical. Nothing in that code path depends on the backend: with NCCL the
  gradient bucket is all-reduced on the GPU and the row gathers (TD-JEPA's and FB's row-pairing losses and goal
  mixing) use NCCL's all-gather and reduce-scatter. An all-reduce hands every rank the same sums, so ranks stay
  identical on any backend; `check_consistent` verifies it at every checkpoint and stops the run if not.
- **One process per GPU.** torchrun starts `--nproc_per_node` processes per node; each takes
  `cuda:<LOCAL_RANK>` (`device=auto` or `cuda`), the process group serves CPU tensors with gloo and CUDA
  tensors with NCCL (`cpu:gloo,cuda:nccl`). Several nodes join through torchrun's c10d rendezvous
  (`--nnodes M --rdzv_backend c10d --rdzv_endpoint host:port`); ranks are numbered across nodes, and each
  rank samples `batch_size / world_size` rows, offline from episodes `id % world_size == rank`.
- **What scales.** Per update, each rank does 1/W of the forward and backward work and one all-reduce per
  optimizer of that optimizer's gradients (a few MB for the paper networks); NCCL's ring all-reduce moves
  about 2x the gradient bytes per GPU whatever W is, so updates/s grow with W until the per-rank batch is too
  small to fill a GPU. Online, each rank adds its own envs (`env.num_envs` per rank; with
  `env.backend=mjwarp`, one batched MuJoCo Warp simulation per GPU), so env frames/s grow with W and the
  update-to-data ratio of the job stays `updates_per_step`.
- **Failures.** A rank that dies makes torchrun stop the job and name the failing rank and its exit code
  (tested with gloo: a rank killed mid-run); surviving ranks outside torchrun's reach (other nodes) fail on
  the next collective (a closed connection at once, or after `LATENTRL_DIST_TIMEOUT` seconds) and name the
  rank that vanished. `resume=true` continues from the last checkpoint (tested); rank 0 alone writes it,
  every rank waits at a barrier around each save.
"""


def report(results: list[dict], args: argparse.Namespace) -> str:
    cores = os.cpu_count()
    lines = [
        "# Data-parallel learners: 1 and N processes",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()} "
        f"({cores} CPU cores, shared with other users' jobs), one torch thread per process, "
        f"`python scripts/bench_scaling.py{' --quick' if args.quick else ''}`.",
        "",
        f"**This machine has only {cores} cores, shared**: {max(args.nproc)} processes compete for the same cores "
        "(and with other jobs, see the load average), so the numbers below show that data-parallel training runs "
        "and what it costs here, not a speed-up. On a machine with a core (or a GPU) per process, each process "
        "does 1/N of every update's work.",
        "",
        "| mode | agent | processes | updates/s | env frames/s | wall s | load avg (1 min) before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        frames = "" if r["frames_per_s"] is None else f"{r['frames_per_s']:.0f}"
        lines.append(f"| {r['mode']} | {r['agent']} (smoke) | {r['nproc']} | {r['updates_per_s']:.1f} | {frames} | "
                     f"{r['wall_s']:.0f} | {r['load'][0]:.2f} -> {r['load'][1]:.2f} |")
    inline = next((r["frames_per_s"] for r in results if r["mode"] == "online, collector.kind=inline"), None)
    for r in results:
        if inline and r["mode"].startswith("online, collector.kind=") and not r["mode"].endswith("=inline"):
            lines.append(f"\n{r['mode']}: x{r['frames_per_s'] / inline:.2f} the env frames/s of the trainer's loop.")
    for mode, key, unit in (("offline", "updates_per_s", "updates/s"), ("online", "frames_per_s", "env frames/s")):
        base = next((r[key] for r in results if r["mode"] == mode and r["nproc"] == 1), None)
        for r in results:
            if base and r["mode"] == mode and r["nproc"] > 1:
                lines.append(f"\n{mode}, {r['nproc']} processes: x{r[key] / base:.2f} the {unit} of one process.")
    lines += [
        "",
        "Not measured separately, so a reading rather than a finding: each process makes one all-reduce per "
        "optimizer step (TD-JEPA 5 per update, METRA 4) and TD-JEPA gathers rows 3 times per update (2 with "
        "gradients sent back); with the tiny `smoke` networks these fixed costs, and two processes on two busy "
        "cores, likely outweigh the halved batch. Online, the two processes also split the rendering "
        "and convolutions of their frames; on 2 shared cores the online "
        "ratio moves with the load from run to run.",
        "",
        f"Offline: TD-JEPA `smoke` networks, global batch {args.batch_size} (per process batch / N), "
        f"{args.updates} updates on a {args.dataset_steps}-step walker dataset (states). Online: METRA `smoke` "
        f"(64x64 pixels rendered every frame, conv encoders) on walker-walk, {args.env_steps} env frames of the job "
        "(each process steps its own env), "
        f"`updates_per_step=0.5`, learning from frame {args.env_steps // 4}. Rates are the trainer's own (from "
        "the start of training, so they include start-up and, online, the frames before learning starts); wall "
        "time includes process start, imports and the process group's rendezvous.",
        "",
        "Collection engines (`collector.kind`, training/collectors.py), one process, 2 envs in all, the same METRA "
        "run: `inline` is the trainer's own loop (2 envs stepped in the learner's process), `sync` TorchRL's "
        "`Collector` in the learner's process (batches of 25 steps per env), `multisync` TorchRL's "
        "`MultiSyncCollector` with 2 worker processes of 1 env each (the learner waits for each batch, then "
        "updates). With 2 shared cores the worker processes compete with the learner, so this measures the "
        "engines' overhead here, not what they give on a many-core node or a Ray cluster.",
        "",
        GUARANTEES,
    ]
    return "\n".join(lines)


def main(argv=None) -> str:
    args = parse_args(argv)
    results = measure(args)
    text = report(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
