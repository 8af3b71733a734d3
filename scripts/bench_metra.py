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
"""

from __future__ import annotations

import argparse
import json
import time
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
        return {**super().state_dict(), "cells": sorted(self.cells)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "cells" not in state_dict:
            print("[bench_metra] this checkpoint keeps no cell set (written before resume support): total coverage "
                  "restarts from the cells visited after the resume", flush=True)
        self.cells = set(map(tuple, state_dict.get("cells", [])))


class CoverageTrainer(Trainer):
    """The trainer (whose evaluations run METRA's coverage) with total-coverage bookkeeping."""

    def __init__(self, cfg, run_dir, *, agent_overrides, bin_size: float = 1.0, curve: list[dict] | None = None):
        self.bin_size = bin_size
        super().__init__(cfg, run_dir, agent_overrides=agent_overrides)
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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


PARTS = {
    # METRA from the physics state on cheetah (x only), the algorithm note's CPU setting.
    "state": {"preset": "small", "obs_type": "physics", "floor": "default", "num_skills": 48,
              "learning_starts": 10000, "buffer_capacity": 1000000},
    # A short pixel run: 64x64 frames on the gradient floor, the CPU pixel preset.
    "pixels": {"preset": "small_pixels", "obs_type": "pixels", "floor": "gradient", "num_skills": 16,
               "learning_starts": 4000, "buffer_capacity": 30000},
}


def run_part(part: str, args: argparse.Namespace) -> dict:
    setting = PARTS[part]
    out = Path(args.out)
    run_dir = Path(args.run_root) / f"{part}-{args.task}-seed{args.seed}"
    steps = args.steps or 200_000
    eval_every = args.eval_every or steps // 5
    overrides = [
        "agent=metra", f"env={args.task}", f"agent.preset={setting['preset']}",
        f"agent.obs_type={setting['obs_type']}", f"agent.eval_num_skills={setting['num_skills']}",
        f"env.action_repeat={args.action_repeat}", f"env.episode_length={args.episode_length}",
        f"env.floor={setting['floor']}", f"steps={steps}", f"learning_starts={setting['learning_starts']}",
        f"updates_per_step={args.updates_per_step}", f"buffer_capacity={setting['buffer_capacity']}",
        f"eval.every={eval_every}", "eval.episodes=1", "eval.video=false", f"checkpoint_every={eval_every}",
        f"log.every={max(eval_every // 10, 1)}", "log.progress=false", "log.tensorboard=false",
        f"threads={args.threads}", f"seed={args.seed}", f"run_dir={run_dir}",
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
    print(f"[bench_metra] {part}: training METRA on {args.task} for {steps} env steps; run dir {run_dir}", flush=True)
    started = time.time()
    trainer.train()
    train_s = time.time() - started + previous.get("train_seconds", 0.0)
    agent, env = trainer.agent, trainer.eval_env
    agent.eval()

    num_skills = agent.config.eval_num_skills  # the part's default or an agent.eval_num_skills override
    random_eval, random_traj = random_eval_coverage(env, num_skills, 1.0, args.seed)
    checkpoints = [r["env_steps"] for r in trainer.curve]
    random_total = random_total_coverage(args.task, checkpoints, episode_length=args.episode_length,
                                         action_repeat=args.action_repeat, bin_size=1.0, seed=args.seed,
                                         num_envs=args.baseline_envs, backend=trainer.cfg.env.backend,
                                         device=str(trainer.env.device))  # where the trainer put its envs
    final = trainer.curve[-1]
    skills_png = out / f"skills_{part}.png"
    last_plot = Path(run_dir) / "eval" / f"skills_{final['env_steps']:09d}.png"
    if last_plot.exists():
        skills_png.parent.mkdir(parents=True, exist_ok=True)
        skills_png.write_bytes(last_plot.read_bytes())
    plot_skill_trajectories(random_traj, np.zeros((len(random_traj), 2)), out / f"random_{part}.png",
                            title=f"uniform random actions on {args.task}: {random_eval} cells")
    plot_curves(trainer.curve, random_eval, random_total, out / f"coverage_{part}.png",
                f"METRA ({part}) on {args.task}, {args.episode_length}-step episodes, action repeat "
                f"{args.action_repeat}")
    result = {
        "part": part, "task": args.task, "steps": steps, "seed": args.seed, "train_seconds": train_s,
        "updates": trainer.updates, "updates_per_step": args.updates_per_step, "threads": args.threads,
        "preset": setting["preset"], "obs_type": setting["obs_type"], "num_skills": num_skills,
        "curve": trainer.curve, "random_eval_coverage": random_eval, "random_total_coverage": random_total,
        "final_coverage_ratio": final["coverage"] / max(random_eval, 1),
        "final_total_coverage_ratio": final["total_coverage"] / max(random_total[-1], 1),
        "goal_reaching": {},
        "machine": machine_description(trainer.device),
        "figures": [str(out / f"coverage_{part}.png"), str(skills_png), str(out / f"random_{part}.png")],
    }
    results_path = out / f"results_{part}.json"
    results_path.write_text(json.dumps(result, indent=2))  # before the goals: a failure there loses nothing
    print(f"[bench_metra] {part}: METRA eval coverage {final['coverage']:.0f} cells vs random {random_eval} "
          f"({result['final_coverage_ratio']:.2f}x); total {final['total_coverage']:.0f} vs {random_total[-1]} "
          f"({result['final_total_coverage_ratio']:.2f}x); {train_s / 60:.1f} min", flush=True)
    if args.goals > 0:
        for controller in ("goal", "random_skill", "random_action"):
            result["goal_reaching"][controller] = goal = evaluate_goal_reaching(
                agent, env, args.goals, goal_range=args.goal_range, threshold=args.goal_threshold, seed=args.seed,
                controller=controller)
            print(f"[bench_metra] goal reaching ({controller}): {goal}", flush=True)
        results_path.write_text(json.dumps(result, indent=2))
    trainer.env.close()
    trainer.eval_env.close()
    return result


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for part in (["state", "pixels"] if args.part == "all" else [args.part]):
        run_part(part, args)


if __name__ == "__main__":
    main()
