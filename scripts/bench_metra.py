"""Benchmark METRA's state coverage against a uniform random policy (docs/bench_metra.md).

Trains METRA through the one trainer (``latentrl.training.trainer.Trainer``), whose evaluations
run METRA's registered evaluation (``latentrl.training.skills.evaluate_metra``: 48 deterministic
skills, unique 1x1 m cells of the body position and a skill plot). Every episode here runs on the one
evaluation path, ``latentrl.training.evaluation.rollout``.
Alongside it measures, with the same env settings:

- **eval coverage**: cells visited by the deterministic skills, against 48 uniform-random-action
  episodes of the same length (the algorithm note's check 4);
- **total coverage**: cells visited by all of METRA's training episodes, against a uniform random
  policy run for the same number of env steps (the paper's "total state coverage");
- **goal reaching** at the end: ``z = normalise(phi(g) - phi(s))`` against a fixed random skill and
  random actions.

Two parts: ``state`` (METRA from the physics state, root position included; default cheetah-run,
the note's CPU setting) and ``pixels`` (a short run from 64x64 frames on the gradient floor).
Results go to ``<out>/results_<part>.json`` and figures to ``<out>/*.png``. The run is checkpointed at
every evaluation; Ctrl-C (or SIGTERM) stops it after the current step, saves a checkpoint, and still writes
the results so far; ``--resume`` with a larger ``--steps`` continues it.

    python scripts/bench_metra.py --part state --steps 200000
    python scripts/bench_metra.py --part pixels --steps 200000 --eval-every 20000 --threads 2 --goals 0 \
        --override env.num_envs=8 env.num_workers=0 agent.lr=3e-4

**Baselines** (docs/bench_metra_baselines.md): ``--algo`` trains METRA's baselines as the official code
runs them, switches of the same learner (``agent.objective``): ``lsd`` (no dual term, spectrally
normalised phi) and ``diayn`` (``log q(z | s')`` reward, Gaussian skills), or measures ``random``
(uniform random actions: evaluation and total coverage at the same checkpoints). ``--seeds`` runs
each algorithm once per seed, one run after the other; each run writes
``<out>/<algo>-seed<k>/results_<part>.json`` (and its figures there), and ``--report`` gathers every
such file under ``--out`` into one figure and the page ``--report-page`` (by default
docs/bench_metra_baselines.md for ``--part state``, docs/bench_metra_baselines_pixels.md for pixels, where
``--report-extra docs/bench_metra/pixels_metra_scene/results_pixels.json`` brings in the METRA pixel run):

    python scripts/bench_metra.py --part state --steps 160000 --eval-every 20000 --updates-per-step 0.25 \
        --algo metra lsd diayn random --seeds 0 1 2 --goals 0 --out /tmp/metra_bl \
        --override env.num_envs=8 env.num_workers=0 agent.lr=3e-4
    python scripts/bench_metra.py --report --out /tmp/metra_bl

Without ``--algo`` / ``--seeds`` a run is METRA with ``--seed``, written to ``<out>/results_<part>.json`` as
before (docs/bench_metra.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from latentrl.agents.base import UniformRandomPolicy
from latentrl.envs import body_position, make_env
from latentrl.replay import ReplayBuffer
from latentrl.training.cli import load_config
from latentrl.training.evaluation import rollout
from latentrl.training.logger import machine_description
from latentrl.training.skills import count_cells, evaluate_goal_reaching, plot_skill_trajectories
from latentrl.training.trainer import Trainer


class CoverageRecordingBuffer(ReplayBuffer):
    """A replay buffer that also keeps the set of body-position cells of every stored next observation."""

    def __init__(self, capacity: int, task: str, bin_size: float, **kwargs):
        super().__init__(capacity, **kwargs)
        self.task, self.bin_size = task, bin_size
        self.cells: set[tuple[int, ...]] = set()

    def extend(self, td, *, flat: bool = False) -> None:
        physics = td["next", "physics"]
        coords = body_position(self.task, physics.reshape(-1, physics.shape[-1]).cpu().numpy())
        self.cells.update(map(tuple, np.floor(coords / self.bin_size).astype(np.int64)))
        super().extend(td, flat=flat)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "cells": sorted(self.cells)}  # np.int64s: save_atomic stores them as ints

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "cells" not in state_dict:
            print("[bench_metra] this checkpoint keeps no cell set (written before resume support): total coverage "
                  "restarts from the cells visited after the resume", flush=True)
        self.cells = set(map(tuple, state_dict.get("cells", [])))


class CoverageTrainer(Trainer):
    """The trainer (whose evaluations run METRA's coverage) with total-coverage bookkeeping.

    Each evaluation's row is also written to ``run_dir/coverage_curve.json``, so that a run stopped before it
    finished resumes with its curve and wall time up to the checkpoint (``curve``, from a finished run's results
    file, takes precedence)."""

    CURVE_FILE = "coverage_curve.json"

    def __init__(self, cfg, run_dir, *, agent_overrides, bin_size: float = 1.0, curve: list[dict] | None = None):
        self.bin_size = bin_size
        super().__init__(cfg, run_dir, agent_overrides=agent_overrides)
        self.curve_path = Path(self.run_dir) / self.CURVE_FILE
        if curve is None and cfg.get("resume") and self.curve_path.exists():
            curve = [r for r in json.loads(self.curve_path.read_text()) if r["env_steps"] <= self.env_steps]
        self.curve: list[dict[str, float]] = list(curve or [])  # a resumed run continues its curve
        self.started = time.time() - (self.curve[-1]["wall_s"] if self.curve else 0.0)

    def make_buffer(self) -> CoverageRecordingBuffer:
        return CoverageRecordingBuffer(self.cfg.buffer_capacity, self.cfg.env.task, self.bin_size, device=self.device)

    def evaluate(self, step: int) -> dict[str, float]:
        metrics = super().evaluate(step)  # runs METRA's registered evaluation (latentrl.training.skills)
        metrics["eval/total_coverage"] = float(len(self.buffer.cells))
        row = {"env_steps": self.env_steps, "updates": self.updates, "wall_s": time.time() - self.started,
               **{k.removeprefix("eval/"): v for k, v in metrics.items()}}
        self.curve.append(row)
        tmp = self.curve_path.with_name(f".{self.CURVE_FILE}.tmp")
        tmp.write_text(json.dumps(self.curve))
        os.replace(tmp, self.curve_path)
        print("[bench_metra] " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        return metrics


def random_total_coverage(task: str, checkpoints: list[int], *, episode_length: int, action_repeat: int,
                          bin_size: float, seed: int, num_envs: int = 1, backend: str = "dmc",
                          device: str = "cpu") -> list[int]:
    """Cells visited by uniform random actions after each of ``checkpoints`` env steps.

    ``num_envs`` episodes run side by side (env steps count all of them); episodes are independent,
    so this only changes how fast the baseline runs, e.g. ``backend="mjwarp"`` on a GPU. Rounds of
    ``num_envs`` episodes run until the last checkpoint; the positions after each step count (not
    the reset's).
    """
    env = make_env(task, obs=("physics",), action_repeat=action_repeat, episode_length=episode_length, seed=seed,
                   num_envs=num_envs, num_workers=0, backend=backend, device=device)
    policy = UniformRandomPolicy(env.action_spec.shape[-1], torch.Generator().manual_seed(seed))
    cells: set[tuple[int, ...]] = set()
    pending = sorted(checkpoints)
    out = []
    step = 0
    try:
        while pending:
            episodes = rollout(env, policy, num_envs, positions=True).episodes
            for t in range(1, max(e.length for e in episodes) + 1):  # the envs step together
                live = [e.positions[t] for e in episodes if t <= e.length]
                cells.update(map(tuple, np.floor(np.stack(live) / bin_size).astype(np.int64)))
                step += len(live)
                while pending and step >= pending[0]:
                    pending.pop(0)
                    out.append(len(cells))
    finally:
        env.close()
    return out


def random_eval_coverage(env, episodes: int, bin_size: float, seed: int) -> tuple[int, list[np.ndarray]]:
    """Cells visited by ``episodes`` uniform-random-action episodes (the eval-coverage baseline)."""
    policy = UniformRandomPolicy(env.action_spec.shape[-1], torch.Generator().manual_seed(seed))
    trajectories = rollout(env, policy, episodes, positions=True).positions
    return count_cells(trajectories, bin_size), trajectories


def _save_figure(fig, title: str, path: Path) -> None:
    """Title ``fig``, write it to ``path`` (its folder made) and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curve: list[dict], random_eval: int, random_total: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["env_steps"] for r in curve]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    ax.plot(steps, [r["coverage"] for r in curve], "o-", label="METRA, deterministic skills")
    ax.axhline(random_eval, color="gray", ls="--", label="uniform random actions")
    ax.set_xlabel("env steps (agent steps, action repeat 2)")
    ax.set_ylabel("unique 1x1 m cells")
    ax.set_title("evaluation coverage (same number of episodes)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(steps, [r["total_coverage"] for r in curve], "o-", label="METRA, all training episodes")
    ax.plot(steps, random_total, "s--", color="gray", label="uniform random, same env steps")
    ax.set_xlabel("env steps (agent steps, action repeat 2)")
    ax.set_title("total coverage", fontsize=9)
    ax.legend(fontsize=8)
    _save_figure(fig, title, path)


PARTS = {
    # METRA from the physics state on cheetah (x only), the algorithm note's CPU setting.
    "state": {"preset": "small", "obs_type": "physics", "floor": "default", "num_skills": 48,
              "learning_starts": 10000, "buffer_capacity": 1000000},
    # A short pixel run: 64x64 frames on the gradient floor, the CPU pixel preset.
    "pixels": {"preset": "small_pixels", "obs_type": "pixels", "floor": "gradient", "num_skills": 16,
               "learning_starts": 4000, "buffer_capacity": 30000},
}


ALGOS = ("metra", "lsd", "diayn", "random")
"""``--algo`` choices: METRA, its baselines as ``agent.objective`` switches, and uniform random actions."""
LABELS = {"metra": "METRA", "lsd": "LSD", "diayn": "DIAYN", "random": "random actions"}


def _layout(args: argparse.Namespace, part: str, algo: str, seed: int) -> tuple[Path, Path]:
    """``(out folder, run dir)`` of one run: the legacy ``<out>``, ``<run_root>/<part>-<task>-seed<k>`` for a
    plain METRA run, or ``<out>/<algo>-seed<k>``, ``<run_root>/<part>-<task>-<algo>-seed<k>`` with ``--algo`` /
    ``--seeds``."""
    if args.algo is None and args.seeds is None:
        return Path(args.out), Path(args.run_root) / f"{part}-{args.task}-seed{seed}"
    return Path(args.out) / f"{algo}-seed{seed}", Path(args.run_root) / f"{part}-{args.task}-{algo}-seed{seed}"


def run_part(part: str, args: argparse.Namespace, algo: str = "metra", seed: int | None = None) -> dict:
    """Train ``algo`` (metra, lsd, diayn) with ``seed`` and measure its coverage; see the module docstring."""
    seed = args.seed if seed is None else seed
    legacy = args.algo is None and args.seeds is None
    setting = PARTS[part]
    out, run_dir = _layout(args, part, algo, seed)
    steps = args.steps or 200_000
    eval_every = args.eval_every or steps // 5
    overrides = [
        "agent=metra", f"env={args.task}", f"agent.preset={setting['preset']}",
        f"agent.obs_type={setting['obs_type']}", f"agent.eval_num_skills={setting['num_skills']}",
        f"agent.objective={algo}",
        f"env.action_repeat={args.action_repeat}", f"env.episode_length={args.episode_length}",
        f"env.floor={setting['floor']}", f"steps={steps}", f"learning_starts={setting['learning_starts']}",
        f"updates_per_step={args.updates_per_step}", f"buffer_capacity={setting['buffer_capacity']}",
        f"eval.every={eval_every}", "eval.episodes=1", "eval.video=false", f"checkpoint_every={eval_every}",
        f"log.every={max(eval_every // 10, 1)}", "log.progress=false", "log.tensorboard=false",
        f"threads={args.threads}", f"seed={seed}", f"run_dir={run_dir}",
        *args.override,
    ]
    cfg = load_config(overrides)
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    cfg.env.obs = ["pixels", "physics"] if setting["obs_type"] == "pixels" else [setting["obs_type"]]
    previous = {}
    if args.resume:
        cfg.resume = True
        previous_path = out / f"results_{part}.json"
        previous = json.loads(previous_path.read_text()) if previous_path.exists() else {}
    trainer = CoverageTrainer(cfg, run_dir, agent_overrides=dict(cfg.agent.get("overrides", {})),
                              curve=previous.get("curve"))
    label = LABELS[algo]
    print(f"[bench_metra] {part}: training {label} on {args.task} for {steps} env steps (seed {seed}); "
          f"run dir {run_dir}", flush=True)
    trainer.train()
    train_s = time.time() - trainer.started  # every piece of a resumed run (less any time past its last checkpoint)
    agent, env = trainer.agent, trainer.eval_env
    agent.eval()

    num_skills = agent.config.eval_num_skills  # the part's default or an agent.eval_num_skills override
    final = trainer.curve[-1]
    skills_png = out / f"skills_{part}.png"
    last_plot = Path(run_dir) / "eval" / f"skills_{final['env_steps']:09d}.png"
    if last_plot.exists():
        skills_png.parent.mkdir(parents=True, exist_ok=True)
        skills_png.write_bytes(last_plot.read_bytes())
    result = {
        "part": part, "algo": algo, "task": args.task, "steps": steps, "seed": seed, "train_seconds": train_s,
        "updates": trainer.updates, "updates_per_step": args.updates_per_step, "threads": args.threads,
        "preset": setting["preset"], "obs_type": setting["obs_type"], "num_skills": num_skills,
        "objective": agent.config.objective,
        "switches": {k: agent.config.switch(k) for k in ("inner", "unit_length", "dual_reg", "spectral_norm")},
        "overrides": list(args.override), "curve": trainer.curve, "goal_reaching": {},
        "machine": machine_description(trainer.device), "figures": [str(skills_png)],
    }
    if legacy:  # the random baselines beside the run (with --algo they are the 'random' runs)
        random_eval, random_traj = random_eval_coverage(env, num_skills, 1.0, seed)
        checkpoints = [r["env_steps"] for r in trainer.curve]
        random_total = random_total_coverage(args.task, checkpoints, episode_length=args.episode_length,
                                             action_repeat=args.action_repeat, bin_size=1.0, seed=seed,
                                             num_envs=args.baseline_envs, backend=trainer.cfg.env.backend,
                                             device=str(trainer.env.device))  # where the trainer put its envs
        plot_skill_trajectories(random_traj, np.zeros((len(random_traj), 2)), out / f"random_{part}.png",
                                title=f"uniform random actions on {args.task}: {random_eval} cells")
        plot_curves(trainer.curve, random_eval, random_total, out / f"coverage_{part}.png",
                    f"METRA ({part}) on {args.task}, {args.episode_length}-step episodes, action repeat "
                    f"{args.action_repeat}")
        result.update({
            "random_eval_coverage": random_eval, "random_total_coverage": random_total,
            "final_coverage_ratio": final["coverage"] / max(random_eval, 1),
            "final_total_coverage_ratio": final["total_coverage"] / max(random_total[-1], 1),
        })
        result["figures"] += [str(out / f"coverage_{part}.png"), str(out / f"random_{part}.png")]
    results_path = out / f"results_{part}.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(result, indent=2))  # before the goals: a failure there loses nothing
    if legacy:
        print(f"[bench_metra] {part}: METRA eval coverage {final['coverage']:.0f} cells vs random {random_eval} "
              f"({result['final_coverage_ratio']:.2f}x); total {final['total_coverage']:.0f} vs {random_total[-1]} "
              f"({result['final_total_coverage_ratio']:.2f}x); {train_s / 60:.1f} min", flush=True)
    else:
        print(f"[bench_metra] {part}: {label} seed {seed}: eval coverage {final['coverage']:.0f} cells, total "
              f"{final['total_coverage']:.0f}; {train_s / 60:.1f} min; {results_path}", flush=True)
    goals = args.goals if agent.config.switch("inner") else 0
    if args.goals > 0 and goals == 0:
        print(f"[bench_metra] {label} has no goal mode (the official code evaluates DIAYN without one): "
              "goal reaching skipped", flush=True)
    if goals > 0:
        for controller in ("goal", "random_skill", "random_action"):
            result["goal_reaching"][controller] = goal = evaluate_goal_reaching(
                agent, env, goals, goal_range=args.goal_range, threshold=args.goal_threshold, seed=seed,
                controller=controller)
            print(f"[bench_metra] goal reaching ({controller}): {goal}", flush=True)
        results_path.write_text(json.dumps(result, indent=2))
    trainer.env.close()
    trainer.eval_env.close()
    return result


def run_random(part: str, args: argparse.Namespace, seed: int) -> dict:
    """The ``random`` run: uniform random actions, evaluation coverage (as many episodes as the skills)
    and total coverage at the learned runs' evaluation checkpoints (``--eval-every`` up to ``--steps``)."""
    setting = PARTS[part]
    out, _ = _layout(args, part, "random", seed)
    steps = args.steps or 200_000
    eval_every = args.eval_every or steps // 5
    checkpoints = list(range(0, steps + 1, eval_every))
    if checkpoints[-1] != steps:
        checkpoints.append(steps)
    started = time.time()
    env = make_env(args.task, obs=("physics",), action_repeat=args.action_repeat, episode_length=args.episode_length,
                   seed=seed, num_envs=1, num_workers=0)
    try:
        random_eval, random_traj = random_eval_coverage(env, setting["num_skills"], 1.0, seed)
    finally:
        env.close()
    totals = random_total_coverage(args.task, [max(c, 1) for c in checkpoints], episode_length=args.episode_length,
                                   action_repeat=args.action_repeat, bin_size=1.0, seed=seed,
                                   num_envs=args.baseline_envs)
    curve = [{"env_steps": c, "coverage": float(random_eval), "total_coverage": float(t if c > 0 else 0)}
             for c, t in zip(checkpoints, totals, strict=True)]
    figure = out / f"skills_{part}.png"
    plot_skill_trajectories(random_traj, np.zeros((len(random_traj), 2)), figure,
                            title=f"uniform random actions on {args.task}: {random_eval} cells")
    result = {"part": part, "algo": "random", "task": args.task, "steps": steps, "seed": seed,
              "num_skills": setting["num_skills"], "curve": curve, "random_eval_coverage": random_eval,
              "seconds": time.time() - started, "machine": machine_description(torch.device("cpu")),
              "figures": [str(figure)]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results_{part}.json").write_text(json.dumps(result, indent=2))
    print(f"[bench_metra] {part}: random actions seed {seed}: eval coverage {random_eval} cells, total "
          f"{totals[-1]} over {steps} steps", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ report
COLOURS = {"metra": "tab:blue", "lsd": "tab:orange", "diayn": "tab:green", "random": "gray"}
SEEDS_PLANNED = (0, 1, 2)


def _gather(out: Path, part: str, extra: list[str], budget: int | None,
            page_results: Path | None = None) -> dict[str, dict[int, dict]]:
    """``{algo: {seed: result}}`` from ``<out>/<algo>-seed<k>/results_<part>.json``, ``extra`` legacy METRA results
    (``--report-extra``: a plain METRA run and its random baselines) and, for the (algo, seed)s neither has, the
    page's own ``results_<part>.json`` from the last report (``page_results``: a run made in an earlier session
    whose folder is gone stays on the page); curves cut at ``budget``."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(out.glob(f"*-seed*/results_{part}.json")):
        r = json.loads(path.read_text())
        r["source"], r["record"] = f"<out>/{path.parent.name}/{path.name}", path.parent
        runs.setdefault(r["algo"], {})[r["seed"]] = r
    kept = {algo: {int(seed): {**r, "algo": algo, "seed": int(seed),  # sources: absolute in pages before 12-06
                               "source": re.sub(r"^/\S*/(\w+-seed\d+/results_\w+\.json)$", r"<out>/\1", r["source"])}
                   for seed, r in by_seed.items()}
            for algo, by_seed in json.loads(page_results.read_text()).items()} if page_results else {}
    made = [r for by_seed in [*runs.values(), *kept.values()] for r in by_seed.values() if not r.get("from_extra")]
    steps = budget or max((r["steps"] for r in made), default=None)
    for path in extra:
        r = json.loads(Path(path).read_text())
        if r.get("part", part) != part:
            continue
        seed = r["seed"]
        last = [c for c in r["curve"] if steps is None or c["env_steps"] <= steps][-1]["env_steps"]
        note = f"{path}, its curve up to {last:,} steps (a {r['steps']:,}-step run)"
        runs.setdefault("metra", {}).setdefault(seed, {**r, "algo": "metra", "source": note, "train_seconds": None,
                                                       "from_extra": True})
        if "random_eval_coverage" in r and seed not in runs.get("random", {}):
            curve = [{"env_steps": c["env_steps"], "coverage": float(r["random_eval_coverage"]),
                      "total_coverage": float(t)} for c, t in zip(r["curve"], r["random_total_coverage"], strict=True)]
            runs.setdefault("random", {})[seed] = {"algo": "random", "seed": seed, "curve": curve, "steps": r["steps"],
                                                   "random_eval_coverage": r["random_eval_coverage"],
                                                   "source": f"{path} (the random baselines of that run)",
                                                   "from_extra": True}
    for algo, by_seed in kept.items():  # the page's last report fills what is missing
        for seed, r in by_seed.items():
            runs.setdefault(algo, {}).setdefault(seed, r)
    for by_seed in runs.values():  # cut every curve at the common budget; updates and minutes at the cut
        for r in by_seed.values():
            r["beyond"] = [c for c in r["curve"] if steps is not None and c["env_steps"] > steps]
            r["curve"] = [c for c in r["curve"] if steps is None or c["env_steps"] <= steps]
            if r["beyond"] and "updates" in r["curve"][-1]:
                r["updates"] = int(r["curve"][-1]["updates"])
                r["train_seconds"] = r["curve"][-1].get("wall_s") if r.get("train_seconds") else None
    return runs


def _final(r: dict, key: str) -> float:
    return float(r["curve"][-1][key])


def plot_baselines(runs: dict[str, dict[int, dict]], path: Path, title: str, num_skills: int = 48) -> None:
    """Evaluation and total coverage against env steps: one thin line per seed, a thick one for the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "coverage", f"evaluation coverage ({num_skills} deterministic skills / episodes)"),
                          (axes[1], "total_coverage", "total coverage (all training episodes)")):
        for algo in ALGOS:
            by_seed = runs.get(algo, {})
            if not by_seed:
                continue
            colour = COLOURS[algo]
            for r in by_seed.values():
                ax.plot([c["env_steps"] for c in r["curve"]], [c[key] for c in r["curve"]], "-", color=colour,
                        alpha=0.35, lw=1)
            common = sorted(set.intersection(*[{c["env_steps"] for c in r["curve"]} for r in by_seed.values()]))
            mean = [np.mean([next(c[key] for c in r["curve"] if c["env_steps"] == x) for r in by_seed.values()])
                    for x in common]
            ax.plot(common, mean, "o-", color=colour, lw=2.2,
                    label=f"{LABELS[algo]} (mean of {len(by_seed)} seed{'s' if len(by_seed) > 1 else ''})")
        ax.set_xlabel("env steps (agent steps, action repeat 2)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        ax.set_ylabel("unique 1 x 1 m cells of torso x")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    _save_figure(fig, title, path)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def write_report(out: Path, page: Path, part: str, extra: list[str] | None = None, budget: int | None = None,
                 run_root: Path | None = None) -> dict:
    """Gather the runs under ``out`` into ``<page stem>/coverage_<part>.png``, ``<page stem>/results_<part>.json``
    (every per-seed curve), the skill plots at the budget (from ``run_root``'s evaluations for runs longer
    than the budget) and the markdown ``page``."""
    folder = page.with_suffix("")
    results = folder / f"results_{part}.json"
    runs = _gather(out, part, list(extra or []), budget, results if results.is_file() else None)
    if not runs:
        raise SystemExit(f"no results_{part}.json under {out}/<algo>-seed<k>/: run the benchmark first")
    steps = max(r["curve"][-1]["env_steps"] for by_seed in runs.values() for r in by_seed.values())
    every = [r for by_seed in runs.values() for r in by_seed.values()]
    any_run = next((r for r in every if not r.get("from_extra")), every[0])  # a made run's machine and overrides
    task = next((r["task"] for r in every if r.get("task")), "cheetah-run")
    figure = folder / f"coverage_{part}.png"
    templates = PAGE_PARTS[part]
    plot_baselines(runs, figure, f"METRA vs LSD vs DIAYN vs random actions, {task} from {templates['observation']}, "
                   f"{steps:,} env steps", PARTS[part]["num_skills"])
    for algo, by_seed in runs.items():  # the skill plots at the budget beside the page
        for seed, r in by_seed.items():
            src = r["record"] / f"skills_{part}.png" if "record" in r else None  # --report-extra's: at its budget
            if r.get("beyond") and run_root is not None:  # a longer run: its plot at the budget's evaluation
                src = (run_root / f"{part}-{task}-{algo}-seed{seed}" / "eval"
                       / f"skills_{r['curve'][-1]['env_steps']:09d}.png")
            if algo != "random" and src is not None and src.is_file():
                (folder / f"skills_{part}_{algo}_seed{seed}.png").write_bytes(src.read_bytes())
    records = folder / "runs"  # each record made under --out, beside the page (--out may not survive the session)
    for r in (r for r in every if "record" in r):
        (records / r["record"].name).mkdir(parents=True, exist_ok=True)
        for src in (r["record"] / f"results_{part}.json", r["record"] / f"skills_{part}.png"):
            if src.is_file():
                (records / r["record"].name / src.name).write_bytes(src.read_bytes())
    link = f"{records.relative_to(page.parent)}/"
    records_text = (f" The runs' own records (`results_{part}.json` and the skills plot), copied by each `--report`,"
                    f" are in [{link}]({link})"
                    + (" (those of the runs made before 2026-12-06 were ignored by git's `runs/` rule and are lost;"
                       " their curves are in the results file)." if part == "pixels" else ".")
                    if records.is_dir() else "")
    kept = ("seed", "steps", "updates", "train_seconds", "objective", "switches", "overrides", "machine", "source",
            "from_extra", "task", "threads", "curve")
    summary = {algo: {str(seed): {**{k: r.get(k) for k in kept}, **({"curve_note": r["curve_note"]}
                                                                   if r.get("curve_note") else {})}
                      for seed, r in sorted(runs[algo].items())} for algo in ALGOS if algo in runs}
    results.write_text(json.dumps(summary, indent=2))

    finals = {algo: {seed: _final(r, "coverage") for seed, r in by_seed.items()} for algo, by_seed in runs.items()}
    totals = {algo: {seed: _final(r, "total_coverage") for seed, r in by_seed.items()}
              for algo, by_seed in runs.items()}
    lines = ["| algorithm | official flags | " + " | ".join(f"seed {s}" for s in SEEDS_PLANNED)
             + " | mean ± sd | total coverage per seed | mean total |", "|---|---|" + "---:|" * 5 + "---:|"]
    flags = {"metra": "(defaults)", "lsd": "`--dual_reg 0 --spectral_normalization 1`",
             "diayn": "`--inner 0 --unit_length 0 --dual_reg 0`", "random": "uniform random actions"}
    for algo in ALGOS:
        f, t = finals.get(algo, {}), totals.get(algo, {})
        cells = [f"{f[s]:.0f}" if s in f else "not run" for s in SEEDS_PLANNED]
        lines.append(f"| {LABELS[algo]} | {flags[algo]} | " + " | ".join(cells) + f" | {_mean_sd(list(f.values()))} | "
                     + ", ".join(f"{t[s]:.0f}" for s in sorted(t)) + f" | {_mean_sd(list(t.values()))} |")
    per_run = ["| algorithm | seed | updates | train min | eval coverage per checkpoint | cos(phi(s_T) - phi(s_0), z) "
               "| mean travel (m) | source |", "|---|---:|---:|---:|---|---:|---:|---|"]
    for algo in ALGOS:
        for seed, r in sorted(runs.get(algo, {}).items()):
            last = r["curve"][-1]
            minutes = f"{r['train_seconds'] / 60:.0f}" if r.get("train_seconds") else "-"
            cov = " → ".join(f"{c['coverage']:.0f}" for c in r["curve"])
            cos = f"{last['skill_direction_cos']:.2f}" if "skill_direction_cos" in last else "-"
            travel = f"{last['mean_travel']:.2f}" if "mean_travel" in last else "-"
            per_run.append(f"| {LABELS[algo]} | {seed} | {r.get('updates', '-') or '-'} | {minutes} | {cov} | {cos} | "
                           f"{travel} | {r['source']} |")
    cut = [f"{LABELS[a]} seed {s} (a {r['steps']:,}-step run; beyond the budget its evaluation coverage was "
           + ", ".join(f"{c['coverage']:.0f} at {c['env_steps'] / 1000:.0f}k" for c in r["beyond"]) + ")"
           for a in ALGOS if a != "random"  # random actions' evaluation is one draw, the same at every step
           for s, r in sorted(runs.get(a, {}).items()) if r.get("beyond")]
    missing = [f"{LABELS[a]} seed {s}" for a in ALGOS for s in SEEDS_PLANNED if s not in runs.get(a, {})]
    repaired = "".join(f" {LABELS[a]} seed {s}'s record: {r['curve_note']}." for a in ALGOS
                       for s, r in sorted(runs.get(a, {}).items()) if r.get("curve_note"))
    made = {a: [s for s, r in by_seed.items() if not r.get("from_extra")] for a, by_seed in runs.items()}
    made = {a: seeds for a, seeds in made.items() if seeds}
    made_here = "; ".join(f"{LABELS[a]} seed{'s' if len(made[a]) > 1 else ''} {', '.join(map(str, sorted(made[a])))}"
                          for a in ALGOS if a in made) or "none"

    def mean(algo: str) -> float | None:
        return float(np.mean(list(finals[algo].values()))) if finals.get(algo) else None

    checks = []
    m, rnd, d, lsd = mean("metra"), mean("random"), mean("diayn"), mean("lsd")
    if m is not None and rnd is not None:
        verdict = "holds" if m >= 2 * rnd else "fails"
        checks.append(f"- METRA ≥ 2 x random (evaluation coverage, mean over seeds): {m:.1f} vs {rnd:.1f} = "
                      f"{m / max(rnd, 1e-9):.1f}x: **{verdict}**.")
    if m is not None and d is not None:
        above = sum(v > max(finals["diayn"].values()) for v in finals["metra"].values())
        checks.append(f"- METRA > DIAYN at equal budget: mean {m:.1f} vs {d:.1f}: **{'holds' if m > d else 'fails'}** "
                      f"({above} of {len(finals['metra'])} METRA seeds above every DIAYN seed).")

    def seed_counts(*algos: str) -> str:
        return " and ".join(str(len(finals[a])) for a in algos) + " seeds"

    if m is not None and lsd is not None:
        checks.append(f"- METRA vs LSD (not one of the note's checks): mean {m:.1f} vs {lsd:.1f} "
                      f"({seed_counts('metra', 'lsd')}): METRA is {'ahead' if m > lsd else 'not ahead'}.")
    if lsd is not None and d is not None:
        # two learners that both stay at random actions' coverage are not ordered by a cell's difference
        at_random = (f"; both at or below random actions' {rnd:.1f}"
                     if rnd is not None and max(lsd, d) <= rnd else "")
        checks.append(f"- LSD vs DIAYN: mean {lsd:.1f} vs {d:.1f} ({seed_counts('lsd', 'diayn')}): "
                      f"LSD is {'ahead' if lsd > d else 'not ahead'}{at_random}.")
    machine = " / ".join(dict.fromkeys(r["machine"] for r in every if r.get("machine") and not r.get("from_extra"))
                         ) or any_run.get("machine", "")  # each machine the runs were made on, in order
    overrides = " ".join(any_run.get("overrides", []))
    fields = dict(
        steps=f"{steps:,}", steps_raw=steps, task=task, cut=", ".join(cut) or "none", machine=machine,
        overrides=overrides, threads=_threads(runs), algos=" ".join(a for a in ALGOS if a in made),
        seeds=" ".join(str(s) for s in sorted({s for a in made for s in made[a]})),
        extra=" ".join(extra or []), not_run=", ".join(missing) or "none", repaired=repaired,
        made_here=made_here, records=records_text, results=results.relative_to(page.parent),
        eval_every=_eval_every(runs))
    page_text = PAGE.format(
        title=templates["title"], setting=templates["setting"].format(**fields),
        commands=templates["commands"].format(**fields), shortfall=templates["shortfall"].format(**fields), **fields,
        table="\n".join(lines),
        per_run="\n".join(per_run), checks="\n".join(checks) or "- (not enough runs for the checks)",
        figure=figure.relative_to(page.parent), part=part,
        skills=", ".join(f"[{p.stem.removeprefix(f'skills_{part}_')}]({p.relative_to(page.parent)})"
                         for p in sorted(folder.glob(f"skills_{part}_*.png"))) or "none",
    )
    page.write_text(page_text)
    print(f"[bench_metra] wrote {page}, {figure}", flush=True)
    return runs


PAGE = """# METRA against its baselines LSD and DIAYN: {title} at equal budget

<!-- Generated by `python scripts/bench_metra.py --report ...` (scripts/bench_metra.py `write_report`); edit the
generator, not this page. -->

METRA's paper compares it with LSD and DIAYN (and others) by the state coverage of their skills. The
official code runs both baselines as flags of METRA's learner (README; `shared/algorithms/metra.md` §4),
and so does this framework: `agent.objective=lsd` / `agent.objective=diayn` (or `recipe=lsd_state`,
`recipe=diayn_state`) set the switches of `METRAAgent` (`agents/metra.py`, `world_models/metra.py`):

| objective | reward of the skill policy | phi's objective | skills (continuous) |
|---|---|---|---|
| METRA | (phi(s') - phi(s))ᵀz | reward + λ min(ε, 1 - mean_d Δφ²), λ learned | sphere |
| LSD (`--dual_reg 0 --spectral_normalization 1`) | (phi(s') - phi(s))ᵀz | reward alone; phi spectral-normed | sphere |
| DIAYN (`--inner 0 --unit_length 0 --dual_reg 0`) | log q(z \\| s'), q = N(phi(s'), σ(s')²) | reward alone | N(0, I) |

Each update is checked against a transcription of the official update in
`tests/test_reference_updates.py` (`test_metra_baseline_update_matches_reference`).

## Setting

{setting}

```
{commands}
```

Runs longer than the budget are cut at it: {cut}. A run's curve up to a step does not depend on its
length (nothing is scheduled on `steps`; evaluations and checkpoints every {eval_every} steps in all runs).

## Results: evaluation coverage at {steps} steps (cells)

{table}

![coverage]({figure})

Curves: thin lines are single seeds, thick lines the mean. Per run:

{per_run}

Runs made with the commands above (each learner with its own seeds): {made_here}. Runs not made (out of the
planned 3 seeds each): {not_run}.{repaired}

Final skill plots: {skills}. Every per-seed curve: [{results}]({results}).

## The algorithm note's check 4 and the paper

{checks}

{shortfall}
"""

PAGE_PARTS = {
    "state": {
        "title": "state coverage", "observation": "states",
        "setting": """\
Everything but the objective is the same for the three learners, and equal to the METRA run of
[bench_metra.md](bench_metra.md): dm_control `{task}` from the physics state (root x included, normalised
after 100 batches), action repeat 2, 200-step episodes, 8 envs in one process, preset `small`
(2-D continuous skills, 2 x 256 MLPs), 1 update per 4 agent steps after 10,000 steps, minibatch 256,
**{steps} agent steps per run**, one torch thread, the overrides `{overrides}`. Coverage is the official
`MjNumUniqueCoords`: unique 1 x 1 m cells of torso x over 48 deterministic skill rollouts (random
actions: 48 episodes); total coverage counts the cells of all training episodes (random actions: the
same number of env steps). Machine: {machine}, shared with other jobs (load 2-5 on 2 cores), so the
wall times are not comparable between runs.""",
        "commands": """\
python scripts/bench_metra.py --part state --steps {steps_raw} --eval-every 40000 --updates-per-step 0.25 \\
    --goals 0 --algo metra lsd diayn random --seeds 0 1 2 --out /tmp/metra_bl --run-root /tmp/metra_bl/runs \\
    --override env.num_envs=8 env.num_workers=0 agent.lr=3e-4
python scripts/bench_metra.py --report --out /tmp/metra_bl --run-root /tmp/metra_bl/runs \\
    --report-extra docs/bench_metra/results_state.json --report-budget {steps_raw}""",
        "shortfall": """\
The paper ([P], `shared/algorithms/metra.md` §7) reports coverage as figures only (Fig. 5), without
numeric tables, and claims that METRA "achieves the best coverage in most of the environments"; the note
records no number for LSD or DIAYN, so there is no published value to set beside ours. The paper's runs
differ from these in every size: Gym HalfCheetah with 16 discrete skills, 2 x 1024 networks, lr 1e-4 and
about 1e7 env steps per run (the note's §4), where ours use dm_control cheetah, 2-D continuous skills,
2 x 256 networks, lr 3e-4 and {steps} steps, so only the ordering can be compared, not the counts.

Where ours falls short: the budget is about 1% of the paper's; 3 seeds were planned for each learner
and the table says which runs were not made; at this budget the baselines' skills barely move (the mean
travel column), so they tell apart METRA from LSD and DIAYN but not LSD from DIAYN; from pixels (METRA's
scene) see [bench_metra_baselines_pixels.md](bench_metra_baselines_pixels.md); quadruped was not run for the
baselines.{records}""",
    },
    "pixels": {
        "title": "coverage from pixels", "observation": "pixels",
        "setting": """\
Everything but the objective is the same for the learners, and equal to the METRA pixel run of
[bench_metra.md](bench_metra.md#pixels) on METRA's scene: dm_control `{task}` from 64x64 frames (3-frame stacks;
the gradient floor, `env.floor=gradient`, so that position shows in the pixels), action repeat 2, 200-step
episodes, 8 envs in one process, preset `small_pixels` (CNN depths 16 -> 128, 2 x 256 MLPs, 2-D continuous
skills, minibatch 64), 0.125 updates per agent step after 4,000 steps, buffer 30,000, **{steps} agent steps
per run**, {threads} torch threads, the overrides `{overrides}`. Coverage is the official `MjNumUniqueCoords`:
unique 1 x 1 m cells of torso x over 16 deterministic skill rollouts (random actions: 16 episodes, from
the METRA run's file); total coverage counts the cells of all training episodes (random actions: the same
number of env steps). METRA seed 0 is the pixel run of bench_metra.md (`--report-extra`), cut at the
budget. Machine: {machine}; wall times depend on what else ran beside a run. Every run's curve is kept in
[{results}]({results}), and a later `--report` takes from there the runs whose `<out>/<algo>-seed<k>/` folder is
gone (a session's `/work` may not survive), so runs can be added one at a time.{records}""",
        "commands": """\
python scripts/bench_metra.py --part pixels --steps {steps_raw} --eval-every 20000 --updates-per-step 0.125 \\
    --threads {threads} --goals 0 --algo {algos} --seeds {seeds} --out /tmp/metra_px_bl \\
    --run-root /tmp/metra_px_bl/runs --override env.num_envs=8 env.num_workers=0 agent.lr=3e-4
python scripts/bench_metra.py --part pixels --report --out /tmp/metra_px_bl --run-root /tmp/metra_px_bl/runs \\
    --report-extra {extra} --report-budget {steps_raw}""",
        "shortfall": """\
The paper ([P], `shared/algorithms/metra.md` §7) shows pixel coverage as figures only (Fig. 5, pixel
Quadruped and Humanoid; the note records no number for LSD or DIAYN), and its pixel runs are 6e6-1e7 env
steps with 2 x 1024 networks; ours are {steps} steps of a small preset on cheetah, so only the ordering
can be compared.

Where ours falls short: the runs listed above as not made (a learner with one seed has no error bar; the
METRA curve is one run); the budget is a few percent of the paper's; pixel quadruped
(the paper's headline) was not run for the baselines.""",
    },
}
"""The parts' own paragraphs of the baselines page (``str.format`` templates over ``write_report``'s fields)."""


REPORT_PAGES = {"state": "docs/bench_metra_baselines.md", "pixels": "docs/bench_metra_baselines_pixels.md"}
"""``--report``'s default page per part."""


def _eval_every(runs: dict[str, dict[int, dict]]) -> str:
    """The evaluation spacing of the learned runs' curves, as the page says it: the commonest gap between
    checkpoints (the first evaluation is after the first env step, so its gap is a few steps short)."""
    gaps = Counter(b["env_steps"] - a["env_steps"] for algo, by_seed in runs.items() if algo != "random"
                   for r in by_seed.values() for a, b in zip(r["curve"], r["curve"][1:], strict=False))
    return f"{gaps.most_common(1)[0][0]:,}" if gaps else "?"


def _threads(runs: dict[str, dict[int, dict]]) -> str:
    """The learners' torch threads as the runs recorded them (one value, or the values seen)."""
    seen = sorted({r["threads"] for by_seed in runs.values() for r in by_seed.values() if r.get("threads")})
    return "/".join(map(str, seen)) or "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["state", "pixels", "all"], default="state")
    parser.add_argument("--task", default="cheetah-run", help="a domain with a torso position (cheetah, quadruped)")
    parser.add_argument("--steps", type=int, default=0, help="env steps to train (0: 200k; pixels rise from ~140k)")
    parser.add_argument("--eval-every", type=int, default=0, help="env steps between evaluations (0: steps / 5)")
    parser.add_argument("--updates-per-step", type=float, default=0.125,
                        help="updates per env step (METRA's pixel DMC ratio: 200 per 8 x 200 steps)")
    parser.add_argument("--episode-length", type=int, default=200, help="agent steps per episode (METRA: 200)")
    parser.add_argument("--action-repeat", type=int, default=2, help="METRA's DMC action repeat")
    parser.add_argument("--goals", type=int, default=24, help="goals for the goal-reaching comparison (0: skip)")
    parser.add_argument("--goal-range", type=float, default=5.0, help="goal torso coordinates in [-range, range]")
    parser.add_argument("--goal-threshold", type=float, default=1.0, help="success: final distance below this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the learner")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-envs", type=int, default=1,
                        help="parallel envs of the random total-coverage baseline (e.g. 256 with env.backend=mjwarp "
                             "on a GPU; the same env steps either way)")
    parser.add_argument("--out", default="docs/bench_metra", help="folder for figures and results JSON")
    parser.add_argument("--run-root", default="runs/bench_metra", help="folder for the training runs")
    parser.add_argument("--override", nargs="*", default=[], help="extra train_agent.py overrides (key=value)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-root from its checkpoint up to --steps (raise --steps), "
                             "keeping the curve in --out/results_<part>.json")
    parser.add_argument("--algo", nargs="+", choices=ALGOS, default=None,
                        help="METRA and its baselines (agent.objective switches), or uniform random actions; with "
                             "--algo / --seeds each run writes <out>/<algo>-seed<k>/results_<part>.json")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds, one run each (default: --seed)")
    parser.add_argument("--report", action="store_true",
                        help="no training: gather <out>/<algo>-seed<k>/results_<part>.json into a figure and a page")
    parser.add_argument("--report-page", default=None,
                        help="the markdown page --report writes (its figure goes to <page stem>/; default "
                             "docs/bench_metra_baselines.md for --part state, docs/bench_metra_baselines_pixels.md "
                             "for pixels)")
    parser.add_argument("--report-extra", nargs="*", default=[],
                        help="with --report: results of plain METRA runs (docs/bench_metra/results_state.json) to "
                             "count as METRA and random seeds, their curves cut at the budget")
    parser.add_argument("--report-budget", type=int, default=0,
                        help="with --report: cut every curve at this many env steps (0: the runs' --steps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = ["state", "pixels"] if args.part == "all" else [args.part]
    if args.report:
        if args.report_page is not None and len(parts) > 1:
            parser.error("--report-page names one page; with --part all each part writes its own default page")
        for part in parts:
            page = Path(args.report_page or REPORT_PAGES[part])
            write_report(Path(args.out), page, part, args.report_extra, args.report_budget or None,
                         Path(args.run_root))
        return
    for part in parts:
        for seed in (args.seeds if args.seeds is not None else [args.seed]):
            for algo in (args.algo or ["metra"]):
                if algo == "random":
                    run_random(part, args, seed)
                else:
                    run_part(part, args, algo, seed)


if __name__ == "__main__":
    main()
