"""The one evaluation path (DESIGN.md, "training, evaluation, control").

:func:`rollout` runs whole episodes of a :class:`~latentrl.agents.base.Policy` on a latentrl env and
records what every evaluation needs: per-episode returns (the env's reward, or a task's reward
recomputed from ``("next", "physics")``), lengths, the body position at every step (the one per-task
definition, :meth:`latentrl.envs.Task.body_position`), first and last observations frame-stacked as
the policy sees them, the final physics state, per-step policy extras and the first episode's frames.
The trainer's evaluation, the zero-shot harness (reward tasks and goals), METRA's coverage and goal
reaching (:mod:`latentrl.training.skills`) and the benchmark scripts all call it.

Agent-specific evaluations (METRA's coverage) are not methods of the agent (agents never import
``envs``): they register here with :func:`register_evaluation` and the trainer runs them through
:func:`evaluate_agent` at every evaluation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor
from torchrl.envs import EnvBase

from latentrl.agents.base import Agent, Policy
from latentrl.envs import Task, get_task

__all__ = [
    "Episode",
    "RolloutResult",
    "evaluate_agent",
    "register_evaluation",
    "registered_evaluations",
    "rollout",
]

# Keys of a step's output that are not observations (TorchRL's env.step layout).
_NOT_OBS = ("action", "next", "reward", "done", "terminated", "truncated")


@dataclass
class Episode:
    """One evaluated episode."""

    episode_return: float
    """Sum of the rewards of its steps (the env's, or ``reward_task``'s)."""
    length: int
    """Agent steps until ``done``."""
    positions: np.ndarray | None = None
    """Body position ``[length + 1, k]`` at the reset and after every step (``positions=True``)."""
    first_obs: Tensor | None = None
    """``keep_obs`` at the reset, frame-stacked as the policy reads it (``[k*C, H, W]`` or ``[D]``)."""
    last_obs: Tensor | None = None
    """``keep_obs`` after the last step, frame-stacked the same way."""
    final_physics: Tensor | None = None
    """``physics`` ``[P]`` after the last step (``final_physics=True``)."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """``policy.extras(carry)`` after each step, ``[length, ...]`` per name (``extras=True``)."""


@dataclass
class RolloutResult:
    """What :func:`rollout` measured: one :class:`Episode` per episode, in order, and a video."""

    episodes: list[Episode]
    frames: np.ndarray | None = None
    """``[T + 1, 3, H, W]`` uint8 frames of the first episode (``video=True`` and a ``pixels`` env)."""

    @property
    def returns(self) -> list[float]:
        return [e.episode_return for e in self.episodes]

    @property
    def lengths(self) -> list[int]:
        return [e.length for e in self.episodes]

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def positions(self) -> list[np.ndarray]:
        """Body positions ``[T + 1, k]`` per episode (``positions=True``)."""
        return [e.positions for e in self.episodes]

    def __len__(self) -> int:
        return len(self.episodes)


def _task_of(env: EnvBase) -> Task:
    task = getattr(env, "task", None)
    if not isinstance(task, Task):
        raise ValueError("body positions are read per task from a latentrl env (make_env): "
                         f"{type(env).__name__} has no .task")
    return task


def _require_physics(td: TensorDict, what: str) -> None:
    if "physics" not in td.keys():
        raise KeyError(f"{what} reads the 'physics' key; build the env with make_env(..., obs=(..., 'physics')) "
                       "(train_agent.py includes it with env.obs=auto)")


def rollout(env: EnvBase, policy: Policy | Callable[[int, int], Policy] | None, num_episodes: int, *,
            reward_task: Task | str | None = None, video: bool = False, positions: bool = False,
            keep_obs: str | None = None, obs_frame_stack: int | None = None, extras: bool = False,
            final_physics: bool = False,
            after_reset: Callable[[TensorDict, int, int], tuple[TensorDict, Policy | None]] | None = None
            ) -> RolloutResult:
    """Run ``num_episodes`` whole episodes of ``policy`` on ``env``, in rounds of ``env.batch_size[0]``.

    Each round resets every env (``env.reset()``), starts a carry (``policy.init_carry(n)``) and calls
    ``action, carry = policy.step(obs, carry, is_first)`` with ``is_first`` true for every env at the
    round's first step (every episode starts there) and false after, until every env is ``done``
    (envs that finish early keep stepping; their later steps are not counted). The policy's own
    convenience carry (``policy(obs)`` / ``policy.reset()``) is left alone. Spare episodes of the last
    round are dropped.

    Args:
        policy: one Policy for every round, or ``policy(first, n) -> Policy`` called at the start of
            each round, before its reset, for episodes ``first .. first + n - 1`` (METRA's coverage
            runs other skills per round), or ``None`` when ``after_reset`` returns each round's policy.
        reward_task: a task (or its name) whose reward, recomputed from ``("next", "physics")`` and the
            action, replaces the env's (zero-shot reward tasks); ``None``: the env's reward.
        video: keep the first episode's ``pixels`` frames (``RolloutResult.frames``).
        positions: record the body position (``env.task.body_position``) at the reset and after
            every step (``Episode.positions``); needs ``physics``.
        keep_obs: keep this key's first and last observation, frame-stacked (oldest first, the
            first frame repeated at the reset) with ``obs_frame_stack`` frames (``None``: the policy's
            ``frame_stack`` when it reads ``keep_obs``, else 1): METRA's ``phi(s_T) - phi(s_0)``.
        extras: keep ``policy.extras(carry)`` after every step (``Episode.extras``).
        final_physics: keep ``physics`` after each episode's last step (``Episode.final_physics``).
        after_reset: ``after_reset(td, first, n) -> (td, policy or None)``, called with each round's reset
            observations: the observations to start from, and the round's policy when not None. Goal reaching
            renders its goals here, in the episodes' own scene (reacher's target ball is drawn at reset and is
            not part of the physics state), infers the goal tasks and puts the start state back.

    The policy runs with whatever gradient mode the caller set (``Policy.step`` turns gradients off
    unless the policy uses autograd), so wrap the call in ``torch.no_grad()`` only if that is meant.
    """
    n = int(env.batch_size[0])
    task = get_task(reward_task) if isinstance(reward_task, str) else reward_task
    body = _task_of(env) if positions else None
    fixed = isinstance(policy, Policy)
    if policy is None and after_reset is None:
        raise ValueError("rollout(policy=None) needs after_reset to return each round's policy")
    out: list[Episode] = []
    frames: list[np.ndarray] = []
    while len(out) < num_episodes:
        first_round = not out
        pol = policy if fixed or policy is None else policy(len(out), n)
        td = env.reset()
        if after_reset is not None:
            td, replaced = after_reset(td, len(out), n)
            pol = pol if replaced is None else replaced
        if pol is None:
            raise ValueError("rollout(policy=None): after_reset returned no policy for episodes "
                             f"{len(out)}..{len(out) + n - 1}")
        if positions or final_physics:
            _require_physics(td, "rollout(positions=True / final_physics=True)")
        obs = td.exclude(*_NOT_OBS)
        carry = pol.init_carry(n)
        is_first = torch.ones(n, dtype=torch.bool)
        alive = torch.ones(n, dtype=torch.bool)
        ret = torch.zeros(n, dtype=torch.float64)
        length = torch.zeros(n, dtype=torch.int64)
        pos = [[p] for p in np.asarray(body.body_position(td["physics"].detach().cpu().numpy()))] if positions else None
        final = td["physics"].clone() if final_physics else None
        step_extras: list[dict[str, Tensor]] = []
        if keep_obs is not None:
            k = obs_frame_stack or (pol.frame_stack if pol.obs_key == keep_obs else 1)
            stack = obs[keep_obs].unsqueeze(1).expand(-1, k, *obs[keep_obs].shape[1:])
            first = last = stack.flatten(1, 2).clone()
        if video and first_round and "pixels" in td.keys():
            frames.append(td["pixels"][0].cpu().numpy())
        while alive.any():
            action, carry = pol.step(obs, carry, is_first)
            is_first = torch.zeros(n, dtype=torch.bool)
            if extras:
                step_extras.append({key: value.detach().cpu() for key, value in pol.extras(carry).items()})
            td["action"] = action
            td = env.step(td)
            nxt = td["next"]
            if task is not None:
                reward = torch.as_tensor(task.rewards_from_states(nxt["physics"].cpu().numpy(),
                                                                  td["action"].detach().cpu().numpy()),
                                         dtype=torch.float64)
            else:
                reward = nxt["reward"].reshape(-1).double().cpu()
            ret += reward * alive
            length += alive.long()
            if video and first_round and "pixels" in nxt.keys() and alive[0]:
                frames.append(nxt["pixels"][0].cpu().numpy())
            if positions:
                for i, p in enumerate(np.asarray(body.body_position(nxt["physics"].detach().cpu().numpy()))):
                    if alive[i]:
                        pos[i].append(p)
            if final_physics:
                live = alive.to(final.device)
                final[live] = nxt["physics"][live]
            obs = nxt.exclude(*_NOT_OBS)
            if keep_obs is not None:
                stack = torch.cat([stack[:, 1:], obs[keep_obs].unsqueeze(1)], dim=1)
                live = alive.to(stack.device).reshape(-1, *[1] * (last.dim() - 1))
                last = torch.where(live, stack.flatten(1, 2), last)
            alive &= ~nxt["done"].reshape(-1).cpu()
            td = nxt.clone(False)
        for i in range(min(n, num_episodes - len(out))):
            steps = int(length[i])
            out.append(Episode(
                float(ret[i]), steps,
                positions=np.stack(pos[i]) if positions else None,
                first_obs=first[i] if keep_obs is not None else None,
                last_obs=last[i] if keep_obs is not None else None,
                final_physics=final[i] if final_physics else None,
                extras={key: torch.stack([s[key][i] for s in step_extras[:steps]]) for key in
                        (step_extras[0] if step_extras else {})},
            ))
    return RolloutResult(out, np.stack(frames) if frames else None)


# ------------------------------------------------------------------------- agent-specific evaluations

AgentEvaluation = Callable[..., dict[str, float]]
"""``evaluation(agent, env, *, step, out_dir) -> metrics``: an agent family's extra evaluation."""

_EVALUATIONS: dict[str, list[AgentEvaluation]] = {}
# Modules that register the built-in agents' evaluations, imported at lookup (they import this one).
_BUILTIN = ("latentrl.training.skills",)


def register_evaluation(agent_name: str) -> Callable[[AgentEvaluation], AgentEvaluation]:
    """Decorator: run ``fn(agent, env, *, step, out_dir) -> dict[str, float]`` at every trainer evaluation
    of agents named ``agent_name`` (or subclasses of such an agent). ``env`` is the evaluation env,
    ``out_dir`` a folder for plots; the trainer logs the metrics under ``eval/``."""

    def decorator(fn: AgentEvaluation) -> AgentEvaluation:
        _EVALUATIONS.setdefault(agent_name, []).append(fn)
        return fn

    return decorator


def registered_evaluations(agent: Agent) -> list[AgentEvaluation]:
    """The evaluations registered for ``agent``'s name or those of the agent classes it derives from."""
    for module in _BUILTIN:
        importlib.import_module(module)
    names = [agent.name, *(cls.__dict__["name"] for cls in type(agent).__mro__ if "name" in cls.__dict__)]
    return [fn for name in dict.fromkeys(names) for fn in _EVALUATIONS.get(name, [])]


def evaluate_agent(agent: Agent, env: EnvBase, *, step: int, out_dir: str | Path) -> dict[str, float]:
    """Run the agent's registered evaluations in eval mode (its training mode restored after);
    their metrics together, without the ``eval/`` prefix."""
    evaluations = registered_evaluations(agent)
    metrics: dict[str, Any] = {}
    if not evaluations:
        return metrics
    was_training = agent.training
    agent.eval()
    try:
        for fn in evaluations:
            metrics.update(fn(agent, env, step=step, out_dir=out_dir))
    finally:
        agent.train(was_training)
    return metrics
