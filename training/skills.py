"""Skill evaluations: state coverage and zero-shot goal reaching of METRA's skills.

Both run on :func:`latentrl.training.evaluation.rollout` and measure where the body goes with the
one per-task definition of its position (:meth:`latentrl.envs.Task.body_position`: a free joint's
x-y, else the x (and y) slide joints). :func:`evaluate_metra` is METRA's evaluation at every trainer
evaluation (registered for the agent name ``"metra"``): it logs ``eval/coverage``,
``eval/skill_direction_cos``, ``eval/mean_travel`` (and ``eval/goal_*`` with ``eval_num_goals``) and
writes ``eval/skills_<step>.png``, with the settings of ``agent.config`` (``eval_num_skills``,
``eval_bin_size``, ``eval_num_goals``, ``eval_goal_range``, ``eval_goal_threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchrl.envs import EnvBase

from latentrl.agents.base import GoalObservation, Policy, UniformRandomPolicy
from latentrl.agents.metra import METRAAgent, sample_skills
from latentrl.training.evaluation import _require_physics, _task_of, register_evaluation, rollout

__all__ = [
    "CoverageResult",
    "count_cells",
    "evaluate_coverage",
    "evaluate_goal_reaching",
    "evaluate_metra",
    "plot_skill_trajectories",
]


def count_cells(trajectories: list[np.ndarray], bin_size: float = 1.0) -> int:
    """Unique ``bin_size`` cells visited by all trajectories together (METRA's ``MjNumUniqueCoords``)."""
    if not trajectories:
        return 0
    cells = np.floor(np.concatenate(trajectories, axis=0) / bin_size).astype(np.int64)
    return len({tuple(c) for c in cells})


def _eval_skills(dim: int, discrete: bool, num_skills: int, seed: int,
                 unit_length: bool = True) -> tuple[Tensor, np.ndarray]:
    """METRA's evaluation skills and a colour index: one-hots spread evenly, or prior samples (``N(0, I)``
    without ``unit_length``, DIAYN's prior)."""
    if discrete:
        index = np.concatenate([[i] * (num_skills // dim + (i < num_skills % dim)) for i in range(dim)]).astype(int)
        return F.one_hot(torch.as_tensor(index), dim).float(), index
    skills = sample_skills(num_skills, dim, False, generator=torch.Generator().manual_seed(seed),
                           unit_length=unit_length)
    return skills, np.arange(num_skills)


@dataclass
class CoverageResult:
    """What :func:`evaluate_coverage` measured."""

    coverage: int
    """Unique ``bin_size`` cells visited by the body over all skill rollouts."""
    trajectories: list[np.ndarray]
    """Body positions ``[T + 1, k]`` per skill."""
    skills: np.ndarray
    """The skills ``[S, D]``."""
    direction_cos: float
    """Mean ``cos(phi(s_T) - phi(s_0), z)`` (continuous; discrete: fraction with argmax = the skill)."""
    mean_travel: float
    """Mean distance between the first and last body position."""
    plot_path: Path | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}coverage": float(self.coverage), f"{prefix}skill_direction_cos": self.direction_cos,
                f"{prefix}mean_travel": self.mean_travel, **{f"{prefix}{k}": v for k, v in self.extra.items()}}


def evaluate_coverage(agent: METRAAgent, env: EnvBase, num_skills: int = 48, *, bin_size: float = 1.0,
                      seed: int = 0, plot_path: str | Path | None = None, explore: bool = False) -> CoverageResult:
    """State coverage of METRA's skills (the official ``calc_eval_metrics``).

    Rolls out ``num_skills`` skills with the deterministic policy (continuous: prior samples drawn
    with ``seed``; discrete: each one-hot in turn), reads the body position from ``physics`` at every
    step, counts the unique ``bin_size`` cells, and, with ``plot_path``, writes a PNG of the
    trajectories coloured by skill. ``env``: a latentrl env with ``physics`` and the agent's
    observation key; its ``batch_size`` envs run skills in parallel.
    """
    cfg = agent.config
    skills, colour_index = _eval_skills(cfg.dim_option, cfg.discrete, num_skills, seed,
                                        unit_length=cfg.switch("unit_length") if hasattr(cfg, "switch") else True)

    def make_policy(first: int, n: int) -> Policy:
        z = skills[first:first + n]
        if z.shape[0] < n:  # spare envs of the last round run copies; their episodes are dropped
            z = torch.cat([z, skills[: n - z.shape[0]]])
        return agent.policy(agent.skill_task(z), explore=explore)

    episodes = rollout(env, make_policy, len(skills), positions=True, keep_obs=agent.obs_key).episodes
    trajectories = [e.positions for e in episodes]
    with torch.no_grad():
        first = torch.stack([e.first_obs for e in episodes]).to(agent.device)
        last = torch.stack([e.last_obs for e in episodes]).to(agent.device)
        travel = agent.world_model.phi(last) - agent.world_model.phi(first)
    z = skills.to(agent.device)
    if cfg.discrete:
        direction = (travel.argmax(dim=-1) == z.argmax(dim=-1)).float().mean().item()
    else:
        direction = F.cosine_similarity(travel, z, dim=-1).mean().item()
    mean_travel = float(np.mean([np.linalg.norm(t[-1] - t[0]) for t in trajectories]))
    result = CoverageResult(count_cells(trajectories, bin_size), trajectories, skills.numpy(), direction, mean_travel)
    if plot_path is not None:
        result.plot_path = plot_skill_trajectories(
            trajectories, skills.numpy(), plot_path, discrete=cfg.discrete, colour_index=colour_index,
            title=f"{getattr(cfg, 'objective', 'metra').upper()} skills on {_task_of(env).name}: "
                  f"{result.coverage} cells of {bin_size:g} m",
        )
    return result


def _skill_colours(skills: np.ndarray, discrete: bool, colour_index: np.ndarray | None) -> list:
    import matplotlib

    if discrete:
        index = skills.argmax(axis=1) if colour_index is None else colour_index
        cmap = matplotlib.colormaps["tab10" if skills.shape[1] <= 10 else "tab20"]
        return [cmap(int(i) % cmap.N) for i in index]
    if skills.shape[1] == 1:
        return [(0.8, 0.1, 0.1) if s[0] >= 0 else (0.1, 0.1, 0.8) for s in skills]
    hue = (np.arctan2(skills[:, 1], skills[:, 0]) / (2 * np.pi)) % 1.0
    sat = np.clip(np.linalg.norm(skills[:, :2], axis=1), 0.3, 1.0)
    hsv = np.stack([hue, sat, np.full_like(hue, 0.9)], axis=1)
    return [tuple(c) for c in matplotlib.colors.hsv_to_rgb(hsv)]


def plot_skill_trajectories(trajectories: list[np.ndarray], skills: np.ndarray, path: str | Path, *,
                            discrete: bool = False, colour_index: np.ndarray | None = None,
                            title: str | None = None) -> Path:
    """Write a PNG of body trajectories coloured by skill (hue = the skill's angle in its first two dims).

    2-D positions are drawn as x-y paths; 1-D ones (cheetah's x) as x against the step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colours = _skill_colours(skills, discrete, colour_index)
    fig, ax = plt.subplots(figsize=(5, 5))
    for traj, colour in zip(trajectories, colours, strict=False):
        if traj.shape[1] >= 2:
            ax.plot(traj[:, 0], traj[:, 1], color=colour, lw=1.2)
            ax.plot(traj[-1, 0], traj[-1, 1], "o", color=colour, ms=3)
        else:
            ax.plot(traj[:, 0], np.arange(len(traj)), color=colour, lw=1.2)
    if trajectories and trajectories[0].shape[1] >= 2:
        ax.set_xlabel("torso x (m)")
        ax.set_ylabel("torso y (m)")
        ax.set_aspect("equal", adjustable="datalim")
    else:
        ax.set_xlabel("torso x (m)")
        ax.set_ylabel("step")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_goal_reaching(agent: METRAAgent, env: EnvBase, num_goals: int = 50, *, goal_range: float = 5.0,
                           threshold: float = 1.0, seed: int = 0,
                           controller: Literal["goal", "random_skill", "random_action"] = "goal") -> dict[str, float]:
    """Zero-shot goal reaching (the protocol of METRA's paper, as the CSF codebase evaluates it).

    For each goal: reset, put the body at ``g ~ U[-goal_range, goal_range]^k`` in the reset state
    and render the goal observation there (``env.set_physics_state``), reset again and run the
    policy for one episode. ``controller``: ``"goal"`` (``z = normalise(phi(g) - phi(s))`` every
    step), or the baselines ``"random_skill"`` (a fixed prior skill) and ``"random_action"``.

    Returns ``success`` (final distance < ``threshold``), ``hit_success`` (ever within it),
    ``final_distance`` and ``min_distance`` (means over goals).
    """
    if controller not in ("goal", "random_skill", "random_action"):
        raise ValueError(f"unknown controller {controller!r}; use 'goal', 'random_skill' or 'random_action'")
    index = list(_task_of(env).body_qpos_index)
    rng = torch.Generator().manual_seed(seed)
    goals: list[np.ndarray] = []  # [n, k] per round

    def setup_round(first: int, n: int) -> Policy:
        td = env.reset()
        _require_physics(td, "goal reaching")
        goal = (torch.rand(n, len(index), generator=rng, dtype=torch.float64) * 2 - 1) * goal_range
        state = td["physics"].clone().double()
        state[:, index] = goal.to(state.device)
        goal_obs = env.set_physics_state(state)
        goals.append(goal.numpy())
        if controller == "goal":
            with torch.no_grad():
                return agent.policy(agent.infer_task(GoalObservation(goal_obs)))
        if controller == "random_skill":
            return agent.policy(agent.skill_task(agent.sample_skills(n, generator=rng).cpu()))
        return UniformRandomPolicy(env.action_spec.shape[-1], generator=rng)

    episodes = rollout(env, setup_round, num_goals, positions=True).episodes
    goal_xy = np.concatenate(goals)[:num_goals]
    final, closest = [], []
    for i, episode in enumerate(episodes):
        dist = np.linalg.norm(episode.positions - goal_xy[i], axis=1)
        final.append(dist[-1])
        closest.append(dist.min())
    final_a, closest_a = np.asarray(final), np.asarray(closest)
    return {"success": float((final_a < threshold).mean()), "hit_success": float((closest_a < threshold).mean()),
            "final_distance": float(final_a.mean()), "min_distance": float(closest_a.mean())}


@register_evaluation("metra")
def evaluate_metra(agent: METRAAgent, env: EnvBase, *, step: int, out_dir: str | Path) -> dict[str, float]:
    """METRA's evaluation at every trainer evaluation: state coverage and, with ``eval_num_goals``, goal reaching.

    Writes the skill-trajectory plot to ``<out_dir>/skills_<step>.png``; returns ``coverage``
    (unique ``eval_bin_size`` cells of ``eval_num_skills`` deterministic skill rollouts),
    ``skill_direction_cos`` and ``mean_travel`` (plus ``goal_success``, ``goal_final_distance``, ...
    with goals). The trainer logs them under ``eval/``.
    """
    cfg = agent.config
    result = evaluate_coverage(agent, env, cfg.eval_num_skills, bin_size=cfg.eval_bin_size, seed=step,
                               plot_path=Path(out_dir) / f"skills_{step:09d}.png")
    metrics = result.metrics(prefix="")
    if cfg.eval_num_goals > 0:
        goals = evaluate_goal_reaching(agent, env, cfg.eval_num_goals, goal_range=cfg.eval_goal_range,
                                       threshold=cfg.eval_goal_threshold, seed=step)
        metrics.update({f"goal_{k}": v for k, v in goals.items()})
    return metrics
