"""METRA: metric-aware abstraction for unsupervised skill discovery (Park, Rybkin & Levine, ICLR 2024).

METRA learns a representation ``phi: S -> R^D`` in which one environment step moves at most a
bounded distance (a temporal-distance Lipschitz constraint), and a skill policy ``pi(a | s, z)``
trained with SAC on the intrinsic reward ``r = (phi(s') - phi(s))^T z``: each skill ``z`` travels as
far as possible along its direction in that latent space, so the skills spread over the states
that are far apart in time (e.g. the positions a robot can run to). The objective is the
Kantorovich-Rubinstein dual of a Wasserstein dependency measure between states and skills [P §4].

This module follows the official code (``seohongpark/METRA`` ``iod/metra.py``, ``iod/sac_utils.py``)
where it differs from the paper (see ``shared/algorithms/metra.md``):

- The constraint is on the **mean over latent dims**: ``c = min(eps, 1 - mean_d (phi(s') - phi(s))_d**2)``
  with slack ``eps = 1e-3`` used as a clamp. ``phi`` maximises ``E[r + lambda * c]`` (``lambda``
  detached) and the dual variable, learned in log space with its own Adam, minimises
  ``log_lambda * E[c]``: ``lambda`` rises while the constraint is violated (``c < 0``) and falls while
  it is slack.
- One update on ONE minibatch, in this order: ``phi`` step -> ``lambda`` step (with the ``c`` that
  entered ``phi``'s loss, computed before ``phi``'s step, as the official code does) -> intrinsic
  rewards recomputed with the updated ``phi`` (no gradient into ``phi``) -> twin-Q step -> policy
  step -> temperature step (target entropy ``-|A| / 2``) -> Polyak update of the target Qs.
- Discrete skills (one-hot) use the zero-centred reward ``sum_d (phi(s') - phi(s))_d (z_d - 1/D) D / (D-1)``.
- ``phi``, the policy and each Q have their **own encoder** (DreamerV2 CNN for pixels); the target
  Qs copy theirs. No image augmentation. Rewards are never stored: ``update`` recomputes them from
  the current ``phi`` and the ``skill`` the policy stored with each step.

The skill is drawn at each episode start (unit sphere, or a uniform one-hot), held fixed for the
episode by :class:`METRAPolicy`, and exposed by ``policy.extras()`` so that the trainer stores it
with every step. Zero-shot goal reaching: ``infer_task(GoalObservation(obs))`` keeps ``phi(g)`` and
the policy recomputes ``z = normalise(phi(g) - phi(s))`` at every step (one-hot argmax for discrete
skills).

Differences from the official code, on purpose:

- Bootstrapping stops on ``terminated`` only (TorchRL semantics); the official code stops on its
  ``dones``. The dm_control tasks METRA uses never terminate.
- State inputs are normalised with statistics fixed after ``obs_normalizer_warmup`` update batches
  (:class:`ObservationNormalizer`) where the official state runs use a preset mean / std measured on
  random rollouts; the ``small`` preset turns it on.
- The trainer interleaves collection and updates (``updates_per_step``) instead of running
  ``trans_optimization_epochs`` updates after every 8 trajectories; the update-to-data ratio is the
  same when set as below. The replay buffer's ``learning_starts`` plays ``sac_min_buffer_size``.

The environment is configured by the trainer, not the agent. METRA's published DMC setting is::

    train_agent.py agent=metra env=quadruped-run env.action_repeat=2 env.floor=gradient \\
        env.episode_length=200 env.num_envs=8 learning_starts=10000 updates_per_step=0.125 \\
        buffer_capacity=300000

(``updates_per_step`` = 200 updates per 8 x 200 policy steps for pixels; 50 per 1600 = 0.03125 for
states). ``obs_type="physics"`` reads the full MuJoCo state (``qpos`` with the root position,
``qvel``, ``act``): dm_control's own ``state`` omits the root position, which ``phi`` needs to measure
travel (the official state envs expose all of ``qpos``).

Evaluation: :func:`evaluate_coverage` (unique 1x1 cells visited by the torso over 48 deterministic
skill rollouts, with a trajectory plot) and :func:`evaluate_goal_reaching`;
:meth:`METRAAgent.evaluate` runs them at the trainer's evaluations (logged as ``eval/coverage``, ...).
Measured on cheetah-run from states: 35 cells against 3 for random actions (docs/bench_metra.md).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn
from torchrl.envs import EnvBase

from latentrl.agents.base import (
    Agent,
    GoalObservation,
    Policy,
    RewardSamples,
    SampleSpec,
    Task,
    UniformRandomPolicy,
    UnsupportedTaskError,
    config_from_preset,
)
from latentrl.agents.common import (
    RunningMeanStd,
    TanhGaussianActor,
    TanhNormal,
    mlp,
    resolve_device,
    sac_actor_loss,
    sac_alpha_loss,
    sac_critic_loss,
    sac_td_target,
    soft_update_params,
    xavier_init,
)
from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import make_encoder

__all__ = [
    "PRESETS",
    "CoverageResult",
    "METRAAgent",
    "METRAConfig",
    "METRAPolicy",
    "ObservationNormalizer",
    "Rollout",
    "SkillActor",
    "SkillCritic",
    "TemporalDistanceModel",
    "UniformRandomPolicy",
    "constraint_penalty",
    "count_cells",
    "evaluate_coverage",
    "evaluate_goal_reaching",
    "goal_skill",
    "metra_reward",
    "plot_skill_trajectories",
    "rollout",
    "sample_skills",
    "torso_coordinates",
]

OBS_TYPES = ("pixels", "state", "physics")


@dataclass
class METRAConfig:
    """METRA hyperparameters; the defaults are the official pixel-Quadruped setting (``tests/main.py``
    with the README's ``dmc_quadruped`` command)."""

    obs_type: Literal["pixels", "state", "physics"] = "pixels"
    """Observation the agent reads: ``"pixels"`` (64x64 frames; use ``env.floor=gradient`` so position
    shows), ``"physics"`` (the full MuJoCo state with the root position: METRA's state setting) or
    ``"state"`` (dm_control's observation, which lacks the root position in cheetah / quadruped)."""
    frame_stack: int = 3
    """Frames stacked along channels for pixel observations (ignored otherwise)."""
    encoder_depth: int = 48
    """DreamerV2 CNN depth: channels ``depth * (1, 2, 4, 8)`` (48 -> 1536 features at 64x64); pixels only."""
    dim_option: int = 4
    """Skill dimension D (pixel Quadruped: 4; Humanoid / Ant: 2; Kitchen: 24 discrete; HalfCheetah: 16 discrete)."""
    discrete: bool = False
    """One-hot skills (uniform over D) instead of continuous unit vectors (uniform on the sphere)."""
    hidden_dim: int = 1024
    """Width of the hidden layers of phi, the policy and the Qs."""
    num_hidden_layers: int = 2
    """Hidden layers of phi, the policy and the Qs."""
    obs_normalizer_warmup: int = 0
    """State / physics inputs: update batches whose statistics fix a per-feature mean / std normaliser,
    as METRA's state runs normalise with a preset from random rollouts (0: off; pixels: always off)."""
    lr: float = 1e-4
    """Adam learning rate of every part (``common_lr``) unless overridden below."""
    phi_lr: float | None = None
    """Learning rate of phi and its encoder (``lr_te``); None: ``lr``."""
    policy_lr: float | None = None
    """Learning rate of the policy and its encoder (``lr_op``); None: ``lr``."""
    q_lr: float | None = None
    """Learning rate of the two Qs and their encoders (``sac_lr_q``); None: ``lr``."""
    alpha_lr: float | None = None
    """Learning rate of log alpha (``sac_lr_a``); None: ``lr``; 0 fixes alpha at ``alpha_init`` (Kitchen)."""
    lambda_lr: float | None = None
    """Learning rate of log lambda (``dual_lr``); None: ``lr``."""
    batch_size: int = 256
    """Transitions per update (``trans_minibatch_size``); one minibatch serves phi, lambda and SAC."""
    discount: float = 0.99
    """SAC discount gamma."""
    tau: float = 5e-3
    """Polyak rate of the target Qs."""
    reward_scale: float = 1.0
    """Multiplier of the intrinsic reward in the TD target (``sac_scale_reward``)."""
    dual_lambda_init: float = 30.0
    """Initial Lagrange multiplier lambda of the temporal-distance constraint."""
    dual_slack: float = 1e-3
    """Slack epsilon: the constraint term is ``min(eps, 1 - mean_d dphi_d**2)``."""
    alpha_init: float = 0.01
    """Initial SAC temperature alpha."""
    target_entropy_coef: float = 1.0
    """The target entropy is ``-|A| / 2 * target_entropy_coef`` (``sac_target_coef``)."""
    policy_init_std: float = 1.0
    """Initial std of the policy's Gaussian before the tanh squashing."""
    policy_max_std: float = math.exp(2.0)
    """Upper clamp of the policy's std."""
    eval_num_skills: int = 48
    """Skills rolled out deterministically by :meth:`METRAAgent.evaluate` (``num_random_trajectories``)."""
    eval_bin_size: float = 1.0
    """Side of the cells counted for state coverage, in metres."""
    eval_num_goals: int = 0
    """Goals for zero-shot goal reaching in :meth:`METRAAgent.evaluate` (0: coverage only)."""
    eval_goal_range: float = 5.0
    """Goal torso coordinates are drawn uniformly in ``[-range, range]`` per coordinate."""
    eval_goal_threshold: float = 1.0
    """A goal counts as reached when the final torso distance is below this (metres)."""

    def __post_init__(self) -> None:
        if self.obs_type not in OBS_TYPES:
            raise ValueError(f"METRAConfig.obs_type must be one of {OBS_TYPES}, got {self.obs_type!r}")
        if self.frame_stack < 1:
            raise ValueError(f"METRAConfig.frame_stack must be >= 1, got {self.frame_stack}")
        if self.dim_option < 1:
            raise ValueError(f"METRAConfig.dim_option must be >= 1, got {self.dim_option}")
        if self.discrete and self.dim_option < 2:
            raise ValueError("discrete METRA needs dim_option >= 2 (with one skill the zero-centred reward is 0)")
        for name in ("phi_lr", "policy_lr", "q_lr", "alpha_lr", "lambda_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"METRAConfig.{name} must be >= 0 or None, got {value}")
        if self.dual_lambda_init <= 0.0 or self.alpha_init <= 0.0:
            raise ValueError("dual_lambda_init and alpha_init must be > 0 (they are learned in log space)")

    def lr_of(self, part: str) -> float:
        """The learning rate of ``part`` (``phi``, ``policy``, ``q``, ``alpha`` or ``lambda``)."""
        value = getattr(self, f"{part}_lr")
        return self.lr if value is None else float(value)


PRESETS: dict[str, dict[str, Any]] = {
    # The official pixel-Quadruped setting (4-D continuous skills, 2 x 1024 MLPs, DreamerV2 CNNs).
    "paper": {},
    # Trains on a 2-core CPU: METRA from the full physics state (root position included), as the
    # algorithm note's "CPU state" setting (dm_control cheetah, 2-D continuous skills, 2 x 256 MLPs).
    "small": {"obs_type": "physics", "dim_option": 2, "hidden_dim": 256, "obs_normalizer_warmup": 100},
    # The algorithm note's optional CPU pixel setting: CNN depths 16 -> 128, minibatch 64, 16 eval skills.
    "small_pixels": {"dim_option": 2, "hidden_dim": 256, "encoder_depth": 16, "batch_size": 64,
                     "eval_num_skills": 16},
    # Tiny networks for end-to-end smoke tests.
    "smoke": {"hidden_dim": 32, "encoder_depth": 4, "batch_size": 32, "eval_num_skills": 4},
}


# ----------------------------------------------------------------------------------------- the math


def sample_skills(n: int, dim: int, discrete: bool, *, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> Tensor:
    """``n`` skills ``[n, dim]`` from METRA's prior: unit vectors ``g / |g|``, ``g ~ N(0, I)``, or uniform one-hots."""
    if discrete:
        index = torch.randint(dim, (n,), generator=generator)
        return F.one_hot(index, dim).float().to(device)
    g = torch.randn(n, dim, generator=generator)
    return (g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(device)


def metra_reward(phi_s: Tensor, phi_next: Tensor, skill: Tensor, discrete: bool) -> Tensor:
    """Intrinsic reward ``[B]``: ``(phi(s') - phi(s))^T z``; for one-hot ``z`` the zero-centred form
    ``sum_d dphi_d (z_d - mean(z)) D / (D - 1)``."""
    delta = phi_next - phi_s
    if discrete:
        dim = skill.shape[-1]
        skill = (skill - skill.mean(dim=-1, keepdim=True)) * dim / (dim - 1 if dim > 1 else 1)
    return (delta * skill).sum(dim=-1)


def constraint_penalty(phi_s: Tensor, phi_next: Tensor, slack: float) -> tuple[Tensor, Tensor]:
    """``(c, d)`` ``[B]`` each: the squared latent step ``d = mean_d (phi(s') - phi(s))_d**2`` and the
    constraint term ``c = min(slack, 1 - d)`` (negative while the constraint ``d <= 1`` is violated)."""
    dist = (phi_next - phi_s).square().mean(dim=-1)
    return torch.clamp(1.0 - dist, max=slack), dist


def goal_skill(phi_s: Tensor, phi_goal: Tensor, discrete: bool) -> Tensor:
    """The skill that heads for a goal: ``normalise(phi(g) - phi(s))``, or the one-hot of its argmax."""
    direction = phi_goal - phi_s
    if discrete:
        return F.one_hot(direction.argmax(dim=-1), direction.shape[-1]).to(direction.dtype)
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)


# ----------------------------------------------------------------------------------------- networks


def _make_obs_encoder(cfg: METRAConfig, obs_shape: tuple[int, ...]) -> nn.Module:
    if cfg.obs_type == "pixels":
        c, h, w = obs_shape
        return make_encoder("dreamer", (c * cfg.frame_stack, h, w), depth=cfg.encoder_depth)
    return make_encoder("identity", obs_shape)


class ObservationNormalizer(nn.Module):
    """Per-feature ``(x - mean) / std`` of state vectors with statistics fixed after a warm-up.

    METRA's state runs normalise observations with a preset mean / std measured on random rollouts
    (``--normalizer_type preset``). Here the statistics are folded from the first ``warmup`` update
    batches (drawn from the data collected before training starts, by the near-random initial
    policy) and then frozen. ``warmup = 0`` (and pixels) is the identity.
    """

    def __init__(self, dim: int | None, warmup: int):
        super().__init__()
        self.warmup = int(warmup) if dim is not None else 0
        self.rms = RunningMeanStd((dim,)) if self.warmup > 0 else None
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    @property
    def frozen(self) -> bool:
        return self.rms is None or int(self.batches) >= self.warmup

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold a batch ``[B, D]`` into the statistics during the warm-up."""
        if not self.frozen:
            self.rms.update(x.float().reshape(-1, x.shape[-1]))
            self.batches += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.rms is None:
            return x
        return self.rms.normalize(x.float(), eps=1e-8)


class TemporalDistanceModel(WorldModel):
    """METRA's ``phi`` (the official ``traj_encoder``): its own encoder, then a ReLU MLP to ``R^D``.

    ``encode(obs)`` reads ``obs[obs_key]`` (stacked ``pixels`` ``[*, 3k, H, W]``, ``state`` or
    ``physics`` ``[*, P]``) and returns ``phi(s)`` ``[*, D]``; ``phi(x)`` does the same on the raw tensor
    ``[B, ...]``. ``normalizer`` (state inputs) is applied first; the policy and the Qs read the same
    normalised input. Only the mean head of the official Gaussian module exists (its std head is
    unused there).
    """

    capabilities = frozenset({"encode"})

    def __init__(self, encoder: nn.Module, obs_key: str, dim_option: int, hidden_dims: list[int],
                 normalizer: ObservationNormalizer | None = None):
        super().__init__()
        self.encoder = encoder
        self.normalizer = normalizer if normalizer is not None else ObservationNormalizer(None, 0)
        self.head = mlp(encoder.repr_dim, hidden_dims, dim_option)
        self.head.apply(xavier_init)
        self.obs_key = obs_key
        self.dim_option = dim_option

    def phi(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.normalizer(x)))

    def encode(self, obs: TensorDict) -> Tensor:
        if self.obs_key not in obs.keys():
            raise KeyError(f"METRA's phi reads {self.obs_key!r} but the observation has keys "
                           f"{sorted(map(str, obs.keys()))}")
        x = obs[self.obs_key]
        event_dims = 3 if self.obs_key == "pixels" else 1
        batch_shape = x.shape[: x.dim() - event_dims]
        return self.phi(x.reshape(-1, *x.shape[x.dim() - event_dims:])).reshape(*batch_shape, -1)

    def forward(self, obs: TensorDict) -> Tensor:
        return self.encode(obs)


class SkillActor(nn.Module):
    """``pi(a | s, z)``: its own encoder, then a tanh MLP on ``enc(s) ‖ z`` giving a :class:`TanhNormal`."""

    def __init__(self, encoder: nn.Module, dim_option: int, action_dim: int, hidden_dims: list[int],
                 init_std: float = 1.0, max_std: float = math.exp(2.0)):
        super().__init__()
        self.encoder = encoder
        self.head = TanhGaussianActor(encoder.repr_dim + dim_option, action_dim, hidden_dims, activation="tanh",
                                      init_std=init_std, max_std=max_std)

    def forward(self, x: Tensor, skill: Tensor) -> TanhNormal:
        return self.head(torch.cat([self.encoder(x), skill], dim=-1))


class SkillCritic(nn.Module):
    """One ``Q(s, z, a)``: its own encoder, then a ReLU MLP on ``enc(s) ‖ z ‖ a`` -> ``[B]``."""

    def __init__(self, encoder: nn.Module, dim_option: int, action_dim: int, hidden_dims: list[int]):
        super().__init__()
        self.encoder = encoder
        self.head = mlp(encoder.repr_dim + dim_option + action_dim, hidden_dims, 1)
        self.head.apply(xavier_init)

    def q(self, features: Tensor, skill: Tensor, action: Tensor) -> Tensor:
        return self.head(torch.cat([features, skill, action], dim=-1)).squeeze(-1)

    def forward(self, x: Tensor, skill: Tensor, action: Tensor) -> Tensor:
        return self.q(self.encoder(x), skill, action)


# ------------------------------------------------------------------------------------------- policy


class METRAPolicy(Policy):
    """METRA's skill policy, batched over envs, in one of three modes.

    - ``"prior"`` (no task): each env draws a skill from the prior at its episode start
      (``reset()`` for all, ``reset(mask)`` for the masked envs) and keeps it for the episode.
    - ``"skill"`` (``agent.skill_task(z)``): the given skills ``[D]`` or ``[N, D]``, fixed.
    - ``"goal"`` (``agent.infer_task(GoalObservation(...))``): ``z = normalise(phi(g) - phi(s))``
      recomputed at every step (or, with ``task.info["recompute_every_step"] = False``, at the
      first step of each episode only, METRA's Kitchen protocol).

    Actions are the squashed Gaussian's mean (``tanh(mu)``), or samples with ``explore``.
    ``extras()`` returns the current skills ``{"skill": [N, D]}`` for the replay buffer.
    """

    def __init__(self, agent: METRAAgent, task: Task | None = None, *, explore: bool = False):
        super().__init__(frame_stack=agent.frame_stack)
        self.agent = agent
        self.explore = explore
        self.task = task
        self.mode = "prior" if task is None else ("goal" if task.info.get("kind") == "goal" else "skill")
        self._skill: Tensor | None = None  # [N, D] on the agent's device
        self._goal_fresh: Tensor | None = None  # [N] bool: goal mode without per-step recomputation
        self._out_device = torch.device("cpu")

    @property
    def skill(self) -> Tensor | None:
        """The skills in use ``[N, D]`` (None before the first step of the prior mode)."""
        return self._skill

    def reset(self, mask: Tensor | None = None) -> None:
        super().reset(mask)
        if self.mode == "skill":
            return
        if mask is None:
            self._skill, self._goal_fresh = None, None
            return
        mask = mask.reshape(-1).bool().to(self.agent.device)
        if self.mode == "goal":
            if self._goal_fresh is not None:
                self._goal_fresh |= mask
            return
        if self._skill is None or self._skill.shape[0] != mask.numel():
            self._skill = self.agent.sample_skills(mask.numel())
        elif mask.any():
            self._skill[mask] = self.agent.sample_skills(int(mask.sum()))

    def _skills_for(self, x: Tensor) -> Tensor:
        agent, n = self.agent, x.shape[0]
        if self.mode == "prior":
            if self._skill is None or self._skill.shape[0] != n:
                self._skill = agent.sample_skills(n)
            return self._skill
        if self.mode == "skill":
            z = self.task.z.to(agent.device, torch.float32)
            if z.dim() == 1 or z.shape[0] == 1:
                return z.reshape(1, -1).expand(n, -1)
            if z.shape[0] != n:
                raise ValueError(f"the skill task holds {z.shape[0]} skills but the observation has {n} envs")
            return z
        phi_goal = self.task.z.to(agent.device)
        phi_goal = phi_goal.expand(n, -1) if phi_goal.shape[0] == 1 else phi_goal
        if phi_goal.shape[0] != n:
            raise ValueError(f"the goal task holds {phi_goal.shape[0]} goals but the observation has {n} envs")
        if self.task.info.get("recompute_every_step", True):
            return goal_skill(agent.world_model.phi(x), phi_goal, agent.config.discrete)
        if self._skill is None or self._skill.shape[0] != n:
            self._skill = goal_skill(agent.world_model.phi(x), phi_goal, agent.config.discrete)
        elif self._goal_fresh is not None and self._goal_fresh.any():
            fresh = self._goal_fresh
            self._skill[fresh] = goal_skill(agent.world_model.phi(x[fresh]), phi_goal[fresh], agent.config.discrete)
        self._goal_fresh = torch.zeros(n, dtype=torch.bool, device=agent.device)
        return self._skill

    def act(self, obs: TensorDict) -> Tensor:
        agent = self.agent
        key = agent.obs_key
        if key not in obs.keys():
            raise KeyError(f"the METRA policy reads {key!r}; the observation has keys {sorted(map(str, obs.keys()))}")
        self._out_device = obs[key].device
        x = obs[key].to(agent.device)
        z = self._skills_for(x)
        if self.mode != "prior":
            self._skill = z
        dist = agent.actor(agent.world_model.normalizer(x), z)
        action = dist.sample() if self.explore else dist.mean
        return action.to(self._out_device)

    def extras(self) -> dict[str, Tensor]:
        if self._skill is None:
            return {}
        return {"skill": self._skill.detach().to(self._out_device).clone()}


# -------------------------------------------------------------------------------------------- agent


class METRAAgent(Agent):
    """METRA: phi trained under the temporal-distance constraint, SAC skills on ``(phi(s') - phi(s))^T z``.

    ``obs_shape`` is one env frame ``[3, H, W]`` (pixels; ``frame_stack`` of them are stacked) or
    ``[P]`` (state / physics). Build it from an env with :meth:`from_env` (or ``make_agent("metra", env)``).
    """

    name = "metra"

    def __init__(self, config: METRAConfig, obs_shape: tuple[int, ...], action_dim: int,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.config = cfg = config
        self.device = resolve_device(device)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.action_dim = int(action_dim)
        self.env_steps = 0
        pixels = cfg.obs_type == "pixels"
        if pixels and len(self.obs_shape) != 3:
            raise ValueError(f"obs_type='pixels' needs a frame shape [3, H, W], got {list(self.obs_shape)}")
        if not pixels and len(self.obs_shape) != 1:
            raise ValueError(f"obs_type={cfg.obs_type!r} needs a vector shape [P], got {list(self.obs_shape)}")
        self.obs_key = cfg.obs_type
        hidden = [cfg.hidden_dim] * cfg.num_hidden_layers
        dim = cfg.dim_option

        normalizer = ObservationNormalizer(None if pixels else self.obs_shape[0], cfg.obs_normalizer_warmup)
        self.world_model = TemporalDistanceModel(_make_obs_encoder(cfg, self.obs_shape), self.obs_key, dim, hidden,
                                                 normalizer)
        self.actor = SkillActor(_make_obs_encoder(cfg, self.obs_shape), dim, self.action_dim, hidden,
                                init_std=cfg.policy_init_std, max_std=cfg.policy_max_std)
        self.critic1 = SkillCritic(_make_obs_encoder(cfg, self.obs_shape), dim, self.action_dim, hidden)
        self.critic2 = SkillCritic(_make_obs_encoder(cfg, self.obs_shape), dim, self.action_dim, hidden)
        self.critic1_target = copy.deepcopy(self.critic1).requires_grad_(False)
        self.critic2_target = copy.deepcopy(self.critic2).requires_grad_(False)
        self.log_lambda = nn.Parameter(torch.tensor(math.log(cfg.dual_lambda_init)))
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.alpha_init)))
        self.target_entropy = -self.action_dim / 2.0 * cfg.target_entropy_coef
        self.to(self.device)

        groups = {
            "phi": list(self.world_model.parameters()),
            "lambda": [self.log_lambda],
            "q": [*self.critic1.parameters(), *self.critic2.parameters()],
            "policy": list(self.actor.parameters()),
            "alpha": [self.log_alpha],
        }
        # A learning rate of 0 fixes that part (the official ``--sac_lr_a -1`` fixes alpha).
        self._optimizers = {name: torch.optim.Adam(params, lr=cfg.lr_of(name))
                            for name, params in groups.items() if cfg.lr_of(name) > 0}

    @classmethod
    def from_env(cls, env: EnvBase, *, preset: str = "paper", device: str = "cpu", **overrides: Any) -> METRAAgent:
        """Build from a TorchRL env's specs: ``pixels`` ``[*, 3, H, W]``, ``state`` / ``physics`` ``[*, P]``;
        actions ``[*, A]`` in [-1, 1]."""
        config = config_from_preset(METRAConfig, PRESETS, preset, overrides)
        spec = env.observation_spec
        key = config.obs_type
        if key not in spec.keys():
            raise ValueError(
                f"METRA with obs_type={key!r} needs the env to observe {key!r}, but its observation keys are "
                f"{sorted(map(str, spec.keys()))}; build it with make_env(..., obs=({key!r}, 'physics')) "
                f"(train_agent.py does this with env.obs=auto)"
            )
        obs_shape = tuple(spec[key].shape[-3:]) if key == "pixels" else (spec[key].shape[-1],)
        return cls(config, obs_shape, env.action_spec.shape[-1], device=device)

    @classmethod
    def required_obs(cls, preset: str = "paper", **overrides: Any) -> tuple[str, ...]:
        """The observation key this configuration reads: ``("pixels",)``, ``("state",)`` or ``("physics",)``."""
        return (config_from_preset(METRAConfig, PRESETS, preset, overrides).obs_type,)

    @property
    def frame_stack(self) -> int:
        return self.config.frame_stack if self.config.obs_type == "pixels" else 1

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(batch_size=self.config.batch_size, frame_stack=self.frame_stack, keys=(self.obs_key,))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self._optimizers)

    def sample_skills(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` skills ``[n, D]`` from the prior, on the agent's device."""
        return sample_skills(n, self.config.dim_option, self.config.discrete, device=self.device, generator=generator)

    # ---------------------------------------------------------------------------------- tasks
    def policy(self, task: Task | None = None, *, explore: bool = False) -> METRAPolicy:
        if task is not None:
            kind = task.info.get("kind")
            if kind == "goal" and task.z is None:
                raise ValueError("a METRA goal task needs task.z = phi(goal); build it with agent.infer_task(...)")
            if kind != "goal" and task.z is None:
                raise UnsupportedTaskError(
                    "METRA's policy takes a skill task (agent.skill_task(z)) or a goal task "
                    "(agent.infer_task(GoalObservation(obs))); this task holds neither a skill nor a goal"
                )
            if kind != "goal" and task.z.shape[-1] != self.config.dim_option:
                raise ValueError(f"skills must have {self.config.dim_option} dims, got shape {list(task.z.shape)}")
        return METRAPolicy(self, task, explore=explore)

    def skill_task(self, skill: Tensor) -> Task:
        """A task that runs fixed skills ``[D]`` or ``[N, D]`` (one per env)."""
        skill = torch.as_tensor(skill, dtype=torch.float32)
        if skill.shape[-1] != self.config.dim_option or skill.dim() > 2:
            raise ValueError(f"skills must be [D] or [N, D] with D = {self.config.dim_option}, got {list(skill.shape)}")
        return Task(z=skill, info={"kind": "skill"})

    @torch.no_grad()
    def infer_task(self, spec: RewardSamples | GoalObservation) -> Task:
        """Goal reaching: ``Task(z=phi(g), goal=obs)`` for a :class:`GoalObservation`.

        The goal holds one frame ``[N, 3, H, W]`` (tiled ``frame_stack`` times, as METRA renders its
        goal images) or an already stacked ``[N, 3k, H, W]``, or a state / physics vector ``[N, P]``.
        """
        if isinstance(spec, RewardSamples):
            raise UnsupportedTaskError(
                "METRA cannot infer a reward task: it learns skills, not a reward-conditioned policy "
                "(the paper solves reward tasks with a separately trained high-level policy over skills, "
                "not provided here). Give METRA a GoalObservation, or use an agent with reward inference "
                "(td_jepa, fb)."
            )
        if not isinstance(spec, GoalObservation):
            raise UnsupportedTaskError(f"METRA infers goal tasks only, got {type(spec).__name__}")
        key = self.obs_key
        if key not in spec.obs.keys():
            raise KeyError(f"METRA (obs_type={key!r}) needs the goal observation to hold {key!r}; "
                           f"it has keys {sorted(map(str, spec.obs.keys()))}")
        x = spec.obs[key]
        if key == "pixels":
            channels, stacked = x.shape[-3], 3 * self.frame_stack
            if channels == 3 and stacked != 3:
                x = x.repeat(*([1] * (x.dim() - 3)), self.frame_stack, 1, 1)
            elif channels != stacked:
                raise ValueError(f"goal pixels must have 3 or {stacked} channels, got {channels}")
        elif x.dim() == 1:
            x = x.unsqueeze(0)
        phi_goal = self.world_model.phi(x.reshape(-1, *x.shape[-(3 if key == "pixels" else 1):]).to(self.device))
        return Task(z=phi_goal, goal=spec.obs.select(key).clone(),
                    info={"kind": "goal", "recompute_every_step": True})

    # --------------------------------------------------------------------------------- update
    @torch.no_grad()
    def intrinsic_reward(self, batch: TensorDict) -> Tensor:
        """``[B]`` rewards of a replay batch from the current phi and the batch's ``skill``."""
        x, x_next, skill = self._unpack(batch.to(self.device))[:3]
        phi = self.world_model.phi(torch.cat([x, x_next]))
        return metra_reward(*phi.chunk(2), skill, self.config.discrete)

    def _unpack(self, batch: TensorDict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        key = self.obs_key
        if "skill" not in batch.keys():
            raise KeyError(
                "METRA's update needs the 'skill' the METRA policy stores with each step (policy.extras()); "
                f"the batch has keys {sorted(map(str, batch.keys()))}. Collect data with agent.policy(explore=True)."
            )
        not_terminated = 1.0 - batch["next", "terminated"].float().reshape(-1)
        return batch[key], batch["next", key], batch["skill"].float(), batch["action"].float(), not_terminated

    def _step(self, name: str, loss: Tensor) -> None:
        opt = self._optimizers.get(name)
        if opt is None:
            return
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def update(self, batch: TensorDict) -> dict[str, float]:
        cfg = self.config
        x, x_next, skill, action, not_terminated = self._unpack(batch.to(self.device))
        both = torch.cat([x, x_next])
        self.world_model.normalizer.observe(both)

        # (1) phi: maximise r + lambda * min(eps, 1 - mean_d dphi^2) (lambda detached).
        phi_s, phi_next = self.world_model.phi(both).chunk(2)
        reward = metra_reward(phi_s, phi_next, skill, cfg.discrete)
        penalty, sq_dist = constraint_penalty(phi_s, phi_next, cfg.dual_slack)
        phi_objective = reward + self.log_lambda.exp().detach() * penalty
        phi_loss = -phi_objective.mean()
        self._step("phi", phi_loss)

        # (2) lambda, on the constraint term that entered phi's loss.
        lambda_loss = self.log_lambda * penalty.detach().mean()
        self._step("lambda", lambda_loss)

        # (3) rewards from the updated phi.
        with torch.no_grad():
            sac_reward = metra_reward(*self.world_model.phi(both).chunk(2), skill, cfg.discrete)

        # (4) SAC on (s, z); z' = z (skills are fixed within an episode).
        x, x_next = self.world_model.normalizer(x), self.world_model.normalizer(x_next)
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_dist = self.actor(x_next, skill)
            pre, next_action = next_dist.rsample_with_pre_tanh()
            next_log_prob = next_dist.log_prob(next_action, pre)
            target = sac_td_target(cfg.reward_scale * sac_reward, cfg.discount * not_terminated,
                                   self.critic1_target(x_next, skill, next_action),
                                   self.critic2_target(x_next, skill, next_action), next_log_prob, alpha)
        q1, q2 = self.critic1(x, skill, action), self.critic2(x, skill, action)
        q_loss = sac_critic_loss(q1, q2, target)
        self._step("q", q_loss)

        dist = self.actor(x, skill)
        pre, new_action = dist.rsample_with_pre_tanh()
        log_prob = dist.log_prob(new_action, pre)
        with torch.no_grad():  # the updated Qs' encoders; the policy's gradient flows through the heads
            h1, h2 = self.critic1.encoder(x), self.critic2.encoder(x)
        policy_loss = sac_actor_loss(log_prob, self.critic1.q(h1, skill, new_action),
                                     self.critic2.q(h2, skill, new_action), alpha)
        self._step("policy", policy_loss)

        alpha_loss = sac_alpha_loss(self.log_alpha, log_prob, self.target_entropy)
        self._step("alpha", alpha_loss)

        soft_update_params(self.critic1, self.critic1_target, cfg.tau)
        soft_update_params(self.critic2, self.critic2_target, cfg.tau)

        metrics = {
            "constraint": sq_dist.mean(),
            "constraint_penalty": penalty.mean(),
            "lambda": self.log_lambda.exp(),
            "alpha": self.log_alpha.exp(),
            "policy_entropy": -log_prob.mean(),
            "policy_std": dist.stddev.mean(),
            "phi_loss": phi_loss,
            "phi_objective": phi_objective.mean(),
            "lambda_loss": lambda_loss,
            "q_loss": q_loss,
            "q1_mean": q1.mean(),
            "q_target_mean": target.mean(),
            "policy_loss": policy_loss,
            "alpha_loss": alpha_loss,
            "intrinsic_reward_mean": sac_reward.mean(),
            "intrinsic_reward_std": sac_reward.std() if sac_reward.numel() > 1 else torch.zeros(()),
        }
        values = torch.stack([v.detach().float().reshape(()).to(self.device) for v in metrics.values()]).tolist()
        return dict(zip(metrics, values, strict=True))

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, env: EnvBase, *, step: int, out_dir: str | Path) -> dict[str, float]:
        """State coverage (and, with ``eval_num_goals``, goal reaching): the trainer's evaluation hook.

        Writes the skill-trajectory plot to ``<out_dir>/skills_<step>.png``; returns ``coverage``
        (unique ``eval_bin_size`` cells of ``eval_num_skills`` deterministic skill rollouts),
        ``skill_direction_cos`` and ``mean_travel`` (plus ``goal_success``, ``goal_final_distance``, ...
        with goals). The trainer logs them under ``eval/``.
        """
        cfg = self.config
        was_training = self.training
        self.eval()
        try:
            result = evaluate_coverage(self, env, cfg.eval_num_skills, bin_size=cfg.eval_bin_size, seed=step,
                                       plot_path=Path(out_dir) / f"skills_{step:09d}.png")
            metrics = result.metrics(prefix="")
            if cfg.eval_num_goals > 0:
                goals = evaluate_goal_reaching(self, env, cfg.eval_num_goals, goal_range=cfg.eval_goal_range,
                                               threshold=cfg.eval_goal_threshold, seed=step)
                metrics.update({f"goal_{k}": v for k, v in goals.items()})
        finally:
            self.train(was_training)
        return metrics

    def extra_state(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state.get("env_steps", 0))


# ------------------------------------------------------------------------------- coverage and goals


@functools.cache
def _coordinate_qpos(task_name: str) -> tuple[int, ...]:
    """``qpos`` indices of the root body's x (and y) position: a free joint's first two coordinates,
    or the slide joints along x and y (cheetah / walker: x only; point_mass: x and y)."""
    import mujoco

    from latentrl.envs import get_task

    model = get_task(task_name).make_dm_env(seed=0).physics.model.ptr
    for j in range(model.njnt):
        if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_FREE:
            adr = int(model.jnt_qposadr[j])
            return (adr, adr + 1)
    found: dict[int, int] = {}
    for j in range(model.njnt):
        if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_SLIDE and model.jnt_bodyid[j] != 0:
            axis = np.abs(model.jnt_axis[j])
            for i in (0, 1):
                if axis[i] > 0.99 and i not in found:
                    found[i] = int(model.jnt_qposadr[j])
    if 0 not in found:
        raise ValueError(f"task {task_name!r} has no free joint or x slide joint: no torso position to measure")
    return tuple(found[i] for i in sorted(found))


def torso_coordinates(task_name: str, physics: Tensor | np.ndarray) -> np.ndarray:
    """Torso ``(x, y)`` (or ``x`` alone for planar robots such as cheetah) ``[N, k]`` from ``physics`` ``[N, P]``.

    The ``physics`` key is ``mj_getState(mjSTATE_PHYSICS)``, which starts with ``qpos``.
    """
    physics = np.asarray(torch.as_tensor(physics).detach().cpu().numpy(), dtype=np.float64)
    return physics[..., list(_coordinate_qpos(task_name))]


def count_cells(trajectories: list[np.ndarray], bin_size: float = 1.0) -> int:
    """Unique ``bin_size`` cells visited by all trajectories together (METRA's ``MjNumUniqueCoords``)."""
    if not trajectories:
        return 0
    cells = np.floor(np.concatenate(trajectories, axis=0) / bin_size).astype(np.int64)
    return len({tuple(c) for c in cells})


def _task_name(env: EnvBase) -> str:
    task = getattr(env, "task", None)
    name = getattr(task, "name", None)
    if name is None:
        raise ValueError("coverage and goal evaluation read the torso position of a latentrl env (make_env): "
                         f"{type(env).__name__} has no .task.name")
    return name


def _require_physics(td: TensorDict) -> None:
    if "physics" not in td.keys():
        raise KeyError("coverage and goal evaluation read the torso position from the 'physics' key; build the env "
                       "with make_env(..., obs=(..., 'physics')) (train_agent.py includes it with env.obs=auto)")


@dataclass
class Rollout:
    """One episode: torso coordinates ``[T + 1, k]`` and its first / last stacked observations."""

    coordinates: np.ndarray
    first_obs: TensorDict | None = None
    last_obs: TensorDict | None = None


@torch.no_grad()
def rollout(env: EnvBase, make_policy: Callable[[int, int], Policy], num_episodes: int,
            keep_obs: str | None = None) -> list[Rollout]:
    """Run ``num_episodes`` episodes in rounds of ``env.batch_size[0]`` parallel envs.

    ``make_policy(first, n)`` gives the policy of episodes ``first .. first + n - 1`` of a round.
    Coordinates are recorded at the reset and after every step until the episode ends.
    ``keep_obs`` keeps that key's first and last stacked observations (to evaluate phi there).
    """
    name = _task_name(env)
    n = env.batch_size[0]
    out: list[Rollout] = []
    while len(out) < num_episodes:
        policy = make_policy(len(out), n)
        td = env.reset()
        _require_physics(td)
        policy.reset()
        alive = torch.ones(n, dtype=torch.bool)
        coords = [[c] for c in torso_coordinates(name, td["physics"])]
        obs = td.exclude("action", "next", "done", "terminated", "truncated")
        stacked = policy.stack(obs)
        first = stacked.select(keep_obs).clone() if keep_obs else None
        last = first
        while alive.any():
            td["action"] = policy.act(stacked)
            td = env.step(td)
            nxt = td["next"]
            for i, c in enumerate(torso_coordinates(name, nxt["physics"])):
                if alive[i]:
                    coords[i].append(c)
            obs = nxt.exclude("reward", "done", "terminated", "truncated")
            stacked = policy.stack(obs)
            if keep_obs:
                last = torch.where(alive.to(stacked.device).reshape(-1, *[1] * (stacked[keep_obs].dim() - 1)),
                                   stacked[keep_obs], last[keep_obs])
                last = TensorDict({keep_obs: last}, batch_size=[n])
            alive &= ~nxt["done"].reshape(-1).cpu()
            td = nxt.clone(False)
        for i in range(min(n, num_episodes - len(out))):
            out.append(Rollout(np.stack(coords[i]), first[i] if first is not None else None,
                               last[i] if last is not None else None))
    return out


def _eval_skills(dim: int, discrete: bool, num_skills: int, seed: int) -> tuple[Tensor, np.ndarray]:
    """METRA's evaluation skills and a colour index: one-hots spread evenly, or prior samples."""
    if discrete:
        index = np.concatenate([[i] * (num_skills // dim + (i < num_skills % dim)) for i in range(dim)]).astype(int)
        return F.one_hot(torch.as_tensor(index), dim).float(), index
    skills = sample_skills(num_skills, dim, False, generator=torch.Generator().manual_seed(seed))
    return skills, np.arange(num_skills)


@dataclass
class CoverageResult:
    """What :func:`evaluate_coverage` measured."""

    coverage: int
    """Unique ``bin_size`` cells visited by the torso over all skill rollouts."""
    trajectories: list[np.ndarray]
    """Torso coordinates ``[T + 1, k]`` per skill."""
    skills: np.ndarray
    """The skills ``[S, D]``."""
    direction_cos: float
    """Mean ``cos(phi(s_T) - phi(s_0), z)`` (continuous; discrete: fraction with argmax = the skill)."""
    mean_travel: float
    """Mean distance between the first and last torso position."""
    plot_path: Path | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}coverage": float(self.coverage), f"{prefix}skill_direction_cos": self.direction_cos,
                f"{prefix}mean_travel": self.mean_travel, **{f"{prefix}{k}": v for k, v in self.extra.items()}}


@torch.no_grad()
def evaluate_coverage(agent: METRAAgent, env: EnvBase, num_skills: int = 48, *, bin_size: float = 1.0,
                      seed: int = 0, plot_path: str | Path | None = None, explore: bool = False) -> CoverageResult:
    """State coverage of METRA's skills (the official ``calc_eval_metrics``).

    Rolls out ``num_skills`` skills with the deterministic policy (continuous: prior samples drawn
    with ``seed``; discrete: each one-hot in turn), reads the torso x-y (x for planar robots) from
    ``physics`` at every step, counts the unique ``bin_size`` cells, and, with ``plot_path``, writes
    a PNG of the trajectories coloured by skill. ``env``: a latentrl env with ``physics`` and the
    agent's observation key; its ``batch_size`` envs run skills in parallel.
    """
    cfg = agent.config
    skills, colour_index = _eval_skills(cfg.dim_option, cfg.discrete, num_skills, seed)

    def make_policy(first: int, n: int) -> Policy:
        z = skills[first:first + n]
        if z.shape[0] < n:  # spare envs of the last round run copies; their episodes are dropped
            z = torch.cat([z, skills[: n - z.shape[0]]])
        return agent.policy(agent.skill_task(z), explore=explore)

    episodes = rollout(env, make_policy, len(skills), keep_obs=agent.obs_key)
    trajectories = [e.coordinates for e in episodes]
    first = torch.stack([e.first_obs[agent.obs_key] for e in episodes]).to(agent.device)
    last = torch.stack([e.last_obs[agent.obs_key] for e in episodes]).to(agent.device)
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
            title=f"METRA skills on {_task_name(env)}: {result.coverage} cells of {bin_size:g} m",
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
    """Write a PNG of torso trajectories coloured by skill (hue = the skill's angle in its first two dims).

    2-D coordinates are drawn as x-y paths; 1-D ones (cheetah's x) as x against the step.
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


@torch.no_grad()
def evaluate_goal_reaching(agent: METRAAgent, env: EnvBase, num_goals: int = 50, *, goal_range: float = 5.0,
                           threshold: float = 1.0, seed: int = 0,
                           controller: Literal["goal", "random_skill", "random_action"] = "goal") -> dict[str, float]:
    """Zero-shot goal reaching (the protocol of METRA's paper, as the CSF codebase evaluates it).

    For each goal: reset, put the torso at ``g ~ U[-goal_range, goal_range]^k`` in the reset state
    and render the goal observation there (``env.set_physics_state``), reset again and run the
    policy for one episode. ``controller``: ``"goal"`` (``z = normalise(phi(g) - phi(s))`` every
    step), or the baselines ``"random_skill"`` (a fixed prior skill) and ``"random_action"``.

    Returns ``success`` (final distance < ``threshold``), ``hit_success`` (ever within it),
    ``final_distance`` and ``min_distance`` (means over goals).
    """
    name = _task_name(env)
    index = list(_coordinate_qpos(name))
    n = env.batch_size[0]
    rng = torch.Generator().manual_seed(seed)
    final, closest = [], []
    while len(final) < num_goals:
        td = env.reset()
        _require_physics(td)
        goals = (torch.rand(n, len(index), generator=rng, dtype=torch.float64) * 2 - 1) * goal_range
        state = td["physics"].clone().double()
        state[:, index] = goals.to(state.device)
        goal_obs = env.set_physics_state(state)
        if controller == "goal":
            policy = agent.policy(agent.infer_task(GoalObservation(goal_obs)))
        elif controller == "random_skill":
            policy = agent.policy(agent.skill_task(agent.sample_skills(n, generator=rng).cpu()))
        elif controller == "random_action":
            policy = UniformRandomPolicy(env.action_spec.shape[-1], generator=rng)
        else:
            raise ValueError(f"unknown controller {controller!r}; use 'goal', 'random_skill' or 'random_action'")
        td = env.reset()
        policy.reset()
        goal_xy = goals.numpy()
        dist = np.linalg.norm(torso_coordinates(name, td["physics"]) - goal_xy, axis=1)
        best, last = dist.copy(), dist.copy()
        alive = torch.ones(n, dtype=torch.bool)
        while alive.any():
            td["action"] = policy(td.exclude("action", "next", "done", "terminated", "truncated"))
            td = env.step(td)
            nxt = td["next"]
            dist = np.linalg.norm(torso_coordinates(name, nxt["physics"]) - goal_xy, axis=1)
            live = alive.numpy()
            last[live] = dist[live]
            best[live] = np.minimum(best[live], dist[live])
            alive &= ~nxt["done"].reshape(-1).cpu()
            td = nxt.clone(False)
        take = min(n, num_goals - len(final))
        final.extend(last[:take].tolist())
        closest.extend(best[:take].tolist())
    final_a, closest_a = np.asarray(final), np.asarray(closest)
    return {"success": float((final_a < threshold).mean()), "hit_success": float((closest_a < threshold).mean()),
            "final_distance": float(final_a.mean()), "min_distance": float(closest_a.mean())}
