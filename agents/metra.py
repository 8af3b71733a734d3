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

Evaluation lives in :mod:`latentrl.training.skills` (agents never import ``envs``):
``evaluate_coverage`` (unique 1x1 cells visited by the body over 48 deterministic skill rollouts,
with a trajectory plot) and ``evaluate_goal_reaching``, run at the trainer's evaluations for
``"metra"`` (logged as ``eval/coverage``, ...) with this config's ``eval_*`` fields.
Measured on cheetah-run from states: 35 cells against 3 for random actions (docs/bench_metra.md).

METRA's baselines are switches of this learner, as in the official code (``tests/main.py`` flags,
``METRAConfig.objective`` names the combinations; see :mod:`latentrl.world_models.metra`):

- ``objective="lsd"`` (LSD, Park et al. 2022) = ``--dual_reg 0 --spectral_normalization 1``: the same reward,
  no dual term, a spectrally normalised (1-Lipschitz) ``phi``. Goal reaching uses the same
  ``normalise(phi(g) - phi(s))`` skill.
- ``objective="diayn"`` (DIAYN, Eysenbach et al. 2019) = ``--inner 0 --unit_length 0 --dual_reg 0``: the
  reward is ``log q(z | s')`` (a Gaussian with ``phi``'s mean and a learned std; one-hot skills: the
  softmax), skills are ``z ~ N(0, I)`` (not unit length). It has no goal mode: ``infer_task`` refuses.

    train_agent.py recipe=metra_state agent.objective=lsd      # or recipe=lsd_state / recipe=diayn_state
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.agents.actor_critic import (
    TanhGaussianActor,
    TanhNormal,
    sac_actor_loss,
    sac_alpha_loss,
    sac_critic_loss,
    sac_td_target,
)
from latentrl.agents.base import (
    Agent,
    GoalObservation,
    Policy,
    RewardSamples,
    SampleSpec,
    Task,
    UnsupportedTaskError,
    check_obs_shape,
    resolve_device,
    scalar_metrics,
)
from latentrl.world_models.encoders import make_encoder
from latentrl.world_models.layers import make_adam, mlp, soft_update_params, xavier_init
from latentrl.world_models.metra import ObservationNormalizer, TemporalDistanceModel, constraint_penalty, metra_reward

__all__ = [
    "OBJECTIVES",
    "PRESETS",
    "METRAAgent",
    "METRAConfig",
    "METRAPolicy",
    "ObservationNormalizer",
    "SkillActor",
    "SkillCritic",
    "TemporalDistanceModel",
    "constraint_penalty",
    "goal_skill",
    "metra_reward",
    "sample_skills",
]

OBS_TYPES = ("pixels", "state", "physics")

OBJECTIVES: dict[str, dict[str, bool]] = {
    # The official flags (tests/main.py defaults) and the README's baseline combinations.
    "metra": {"inner": True, "unit_length": True, "dual_reg": True, "spectral_norm": False},
    # LSD: --dual_reg 0 --spectral_normalization 1
    "lsd": {"inner": True, "unit_length": True, "dual_reg": False, "spectral_norm": True},
    # DIAYN: --inner 0 --unit_length 0 --dual_reg 0
    "diayn": {"inner": False, "unit_length": False, "dual_reg": False, "spectral_norm": False},
}
"""METRA and its baselines as the official switches (``METRAConfig.objective``)."""


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
    """Skills rolled out deterministically at each trainer evaluation (``num_random_trajectories``)."""
    eval_bin_size: float = 1.0
    """Side of the cells counted for state coverage, in metres."""
    eval_num_goals: int = 0
    """Goals for zero-shot goal reaching at each trainer evaluation (0: coverage only)."""
    eval_goal_range: float = 5.0
    """Goal torso coordinates are drawn uniformly in ``[-range, range]`` per coordinate."""
    eval_goal_threshold: float = 1.0
    """A goal counts as reached when the final torso distance is below this (metres)."""
    objective: Literal["metra", "lsd", "diayn"] = "metra"
    """Which learner: ``"metra"``, or the baselines as the official code runs them, ``"lsd"``
    (``--dual_reg 0 --spectral_normalization 1``) and ``"diayn"`` (``--inner 0 --unit_length 0 --dual_reg 0``).
    Sets the four switches below unless they are given."""
    inner: bool | None = None
    """``--inner``: reward ``(phi(s') - phi(s))^T z`` (True) or DIAYN's ``log q(z | s')`` (False);
    None: the objective's."""
    unit_length: bool | None = None
    """``--unit_length``: continuous skills on the unit sphere (True) or ``N(0, I)`` (False);
    None: the objective's."""
    dual_reg: bool | None = None
    """``--dual_reg``: the temporal-distance constraint with its learned lambda (needs ``inner``);
    None: the objective's."""
    spectral_norm: bool | None = None
    """``--spectral_normalization``: spectrally normalise phi's layers (LSD); None: the objective's."""

    def __post_init__(self) -> None:
        if self.obs_type not in OBS_TYPES:
            raise ValueError(f"METRAConfig.obs_type must be one of {OBS_TYPES}, got {self.obs_type!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"METRAConfig.objective must be one of {tuple(OBJECTIVES)}, got {self.objective!r}")
        for name in OBJECTIVES["metra"]:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"METRAConfig.{name} must be true, false or None (the objective's), got {value!r}")
        if self.switch("dual_reg") and not self.switch("inner"):
            raise ValueError(f"METRAConfig: dual_reg=True needs inner=True (objective={self.objective!r}): the dual "
                             "term constrains phi(s') - phi(s), which DIAYN's log-likelihood reward (inner=False) "
                             "does not use; the official code has no such combination")
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

    def switch(self, name: str) -> bool:
        """The official flag ``name`` (``inner``, ``unit_length``, ``dual_reg``, ``spectral_norm``): the field
        if given, else the ``objective``'s value."""
        value = getattr(self, name)
        return OBJECTIVES[self.objective][name] if value is None else bool(value)

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
                  generator: torch.Generator | None = None, unit_length: bool = True) -> Tensor:
    """``n`` skills ``[n, dim]`` from METRA's prior: unit vectors ``g / |g|``, ``g ~ N(0, I)``, or uniform one-hots.
    ``unit_length=False`` (DIAYN's continuous prior) returns ``g`` itself."""
    if discrete:
        index = torch.randint(dim, (n,), generator=generator)
        return F.one_hot(index, dim).float().to(device)
    g = torch.randn(n, dim, generator=generator)
    if not unit_length:
        return g.to(device)
    return (g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(device)


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

    - ``"prior"`` (no task): each env draws a skill from the prior at its episode's first step
      (``is_first``, in :meth:`start_episode`) and keeps it for the episode.
    - ``"skill"`` (``agent.skill_task(z)``): the given skills ``task_z`` ``[1, D]`` or ``[N, D]``, fixed.
    - ``"goal"`` (``agent.infer_task(GoalObservation(...))``): ``task_z`` holds ``phi(g)`` and
      ``z = normalise(phi(g) - phi(s))`` is recomputed at every step (or, with
      ``recompute_every_step=False``, at the first step of each episode only, METRA's Kitchen protocol).

    Holds the actor and ``phi`` (with its input normaliser), shared with the agent. The carry holds
    ``skill`` ``[N, D]`` (the skill of the last action) and the frame stack; ``extras(carry)`` returns
    ``{"skill": ...}`` for the replay buffer. Actions are the squashed Gaussian's mean
    (``tanh(mu)``), or samples with ``explore``. ``unit_length=False``: prior skills are ``N(0, I)`` (DIAYN).
    """

    def __init__(self, actor: SkillActor, phi: TemporalDistanceModel, *, obs_shape: tuple[int, ...],
                 frame_stack: int, action_dim: int, discrete: bool, mode: str = "prior",
                 task_z: Tensor | None = None, recompute_every_step: bool = True, explore: bool = False,
                 unit_length: bool = True):
        super().__init__(phi.obs_key, obs_shape, action_dim, frame_stack=frame_stack, explore=explore)
        if mode not in ("prior", "skill", "goal"):
            raise ValueError(f"METRAPolicy mode must be 'prior', 'skill' or 'goal', got {mode!r}")
        if (task_z is None) != (mode == "prior"):
            raise ValueError(f"METRAPolicy mode {mode!r} {'takes no' if mode == 'prior' else 'needs a'} task_z")
        self.actor, self.phi = actor, phi
        self.dim_option, self.discrete = phi.dim_option, bool(discrete)
        self.mode, self.recompute_every_step = mode, bool(recompute_every_step)
        self.unit_length = bool(unit_length)
        if task_z is not None:
            task_z = task_z.detach().to(self.device, torch.float32)
            task_z = task_z.reshape(1, -1) if task_z.dim() == 1 else task_z
        self.register_buffer("task_z", task_z)

    @property
    def skill(self) -> Tensor | None:
        """The skills in use ``[N, D]`` by the convenience call (None before its first step)."""
        return None if self.carry is None else self.carry["skill"]

    def _per_env(self, n: int) -> Tensor:
        z = self.task_z
        if z.shape[0] == 1:
            return z.expand(n, -1)
        if z.shape[0] != n:
            what = "goals" if self.mode == "goal" else "skills"
            raise ValueError(f"the {self.mode} task holds {z.shape[0]} {what} but the observation has {n} envs")
        return z

    def init_carry(self, batch_size: int) -> TensorDict:
        carry = super().init_carry(batch_size)
        carry["skill"] = torch.zeros(batch_size, self.dim_option, device=self.device)  # set at the first step
        return carry

    def start_episode(self, batch_size: int) -> TensorDict:
        carry = self.init_carry(batch_size)
        if self.mode == "prior":
            carry["skill"] = sample_skills(batch_size, self.dim_option, self.discrete, device=self.device,
                                           unit_length=self.unit_length)
        return carry

    def _restart_rows(self, carry: TensorDict, is_first: Tensor) -> TensorDict:
        if self.mode == "prior":
            return super()._restart_rows(carry, is_first)
        return carry  # skill and goal modes set the skill in act(); the frame stack restarts there too

    def act(self, x: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        n = x.shape[0]
        if self.mode == "prior":
            z = carry["skill"]
        elif self.mode == "skill":
            z = self._per_env(n)
        elif self.recompute_every_step:
            z = goal_skill(self.phi.phi(x), self._per_env(n), self.discrete)
        else:
            z = carry["skill"]
            if bool(is_first.any()):
                fresh = goal_skill(self.phi.phi(x[is_first]), self._per_env(n)[is_first], self.discrete)
                z = z.clone()
                z[is_first] = fresh
        if self.mode != "prior":
            carry = carry.clone(False)
            carry["skill"] = z.clone()
        dist = self.actor(self.phi.normalizer(x), z)
        return (dist.sample() if self.explore else dist.mean), carry

    def extras(self, carry: TensorDict | None = None) -> dict[str, Tensor]:
        carry = self.carry if carry is None else carry
        if carry is None:
            return {}
        return {"skill": carry["skill"].detach().clone()}


# -------------------------------------------------------------------------------------------- agent


class METRAAgent(Agent):
    """METRA: phi trained under the temporal-distance constraint, SAC skills on ``(phi(s') - phi(s))^T z``.

    ``obs_shape`` is one env frame ``[3, H, W]`` (pixels; ``frame_stack`` of them are stacked) or
    ``[P]`` (state / physics). Build it from an env with :meth:`from_env` (or ``make_agent("metra", env)``).
    """

    name = "metra"
    config_class = METRAConfig
    presets = PRESETS

    def __init__(self, config: METRAConfig, obs_shape: tuple[int, ...], action_dim: int,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.config = cfg = config
        self.device = resolve_device(device)
        self.obs_shape = check_obs_shape(cfg.obs_type, obs_shape)
        self.action_dim = int(action_dim)
        self.env_steps = 0
        self.obs_key = cfg.obs_type
        hidden = [cfg.hidden_dim] * cfg.num_hidden_layers
        dim = cfg.dim_option

        pixels = cfg.obs_type == "pixels"
        normalizer = ObservationNormalizer(None if pixels else self.obs_shape[0], cfg.obs_normalizer_warmup)
        self.world_model = TemporalDistanceModel(_make_obs_encoder(cfg, self.obs_shape), self.obs_key, dim, hidden,
                                                 normalizer, discrete=cfg.discrete, dual_slack=cfg.dual_slack,
                                                 dual_lambda_init=cfg.dual_lambda_init, inner=cfg.switch("inner"),
                                                 dual_reg=cfg.switch("dual_reg"),
                                                 spectral_norm=cfg.switch("spectral_norm"))
        self.actor = SkillActor(_make_obs_encoder(cfg, self.obs_shape), dim, self.action_dim, hidden,
                                init_std=cfg.policy_init_std, max_std=cfg.policy_max_std)
        self.critic1 = SkillCritic(_make_obs_encoder(cfg, self.obs_shape), dim, self.action_dim, hidden)
        self.critic2 = SkillCritic(_make_obs_encoder(cfg, self.obs_shape), dim, self.action_dim, hidden)
        self.critic1_target = copy.deepcopy(self.critic1).requires_grad_(False)
        self.critic2_target = copy.deepcopy(self.critic2).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.alpha_init)))
        self.target_entropy = -self.action_dim / 2.0 * cfg.target_entropy_coef
        self.to(self.device)

        groups = {
            "phi": self.world_model.phi_parameters(),
            "lambda": [self.world_model.log_lambda],
            "q": [*self.critic1.parameters(), *self.critic2.parameters()],
            "policy": list(self.actor.parameters()),
            "alpha": [self.log_alpha],
        }
        # A learning rate of 0 fixes that part (the official ``--sac_lr_a -1`` fixes alpha).
        self._optimizers = {name: make_adam(params, lr=cfg.lr_of(name))
                            for name, params in groups.items() if cfg.lr_of(name) > 0}

    @property
    def frame_stack(self) -> int:
        return self.config.frame_stack if self.config.obs_type == "pixels" else 1

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(batch_size=self.config.batch_size, frame_stack=self.frame_stack, keys=(self.obs_key,))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self._optimizers)

    def sample_skills(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` skills ``[n, D]`` from the prior (``N(0, I)`` without ``unit_length``), on the agent's device."""
        return sample_skills(n, self.config.dim_option, self.config.discrete, device=self.device, generator=generator,
                             unit_length=self.config.switch("unit_length"))

    # ---------------------------------------------------------------------------------- tasks
    def policy(self, task: Task | None = None, *, explore: bool = False) -> METRAPolicy:
        if task is not None:
            kind = task.info.get("kind")
            if kind == "goal":
                self._check_goal_mode()
            if kind == "goal" and task.z is None:
                raise ValueError("a METRA goal task needs task.z = phi(goal); build it with agent.infer_task(...)")
            if kind != "goal" and task.z is None:
                raise UnsupportedTaskError(
                    "METRA's policy takes a skill task (agent.skill_task(z)) or a goal task "
                    "(agent.infer_task(GoalObservation(obs))); this task holds neither a skill nor a goal"
                )
            if kind != "goal" and task.z.shape[-1] != self.config.dim_option:
                raise ValueError(f"skills must have {self.config.dim_option} dims, got shape {list(task.z.shape)}")
        mode = "prior" if task is None else ("goal" if task.info.get("kind") == "goal" else "skill")
        return METRAPolicy(self.actor, self.world_model, obs_shape=self.obs_shape, frame_stack=self.frame_stack,
                           action_dim=self.action_dim, discrete=self.config.discrete, mode=mode,
                           task_z=None if task is None else task.z,
                           recompute_every_step=True if task is None else task.info.get("recompute_every_step", True),
                           explore=explore, unit_length=self.config.switch("unit_length"))

    def _check_goal_mode(self) -> None:
        """DIAYN (``inner=False``) has no goal skill: its phi is a skill posterior, not a temporal distance."""
        if not self.config.switch("inner"):
            raise UnsupportedTaskError(
                f"zero-shot goal reaching needs the inner-product objective (METRA, LSD: z = normalise(phi(g) - "
                f"phi(s))); this agent runs objective={self.config.objective!r} with inner=False (DIAYN), whose phi "
                "is the mean of q(z | s), and the official code evaluates DIAYN without a goal mode. Use "
                "agent.skill_task(z) or a METRA / LSD agent"
            )

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
        self._check_goal_mode()
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
        return self.world_model.reward(*self.world_model.inputs(batch.to(self.device)))

    def _step(self, names: tuple[str, ...], loss: Tensor) -> None:
        """One backward of ``loss`` and a step of the named optimisers (a missing one: that part is fixed)."""
        opts = [self._optimizers[name] for name in names if name in self._optimizers]
        if not opts:
            return
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()

    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        cfg, wm = self.config, self.world_model
        batch = batch.to(self.device)
        x, x_next, skill = wm.inputs(batch)
        action = batch["action"].float()
        not_terminated = 1.0 - batch["next", "terminated"].float().reshape(-1)
        wm.normalizer.observe(torch.cat([x, x_next]))

        # (1, 2) phi and lambda: the model's objective and its dual, one backward (disjoint parameters).
        model_out = wm.loss(batch)
        self._step(("phi", "lambda"), model_out["loss"])

        # (3) rewards from the updated phi.
        sac_reward = wm.reward(x, x_next, skill)

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
        self._step(("q",), q_loss)

        dist = self.actor(x, skill)
        pre, new_action = dist.rsample_with_pre_tanh()
        log_prob = dist.log_prob(new_action, pre)
        with torch.no_grad():  # the updated Qs' encoders; the policy's gradient flows through the heads
            h1, h2 = self.critic1.encoder(x), self.critic2.encoder(x)
        policy_loss = sac_actor_loss(log_prob, self.critic1.q(h1, skill, new_action),
                                     self.critic2.q(h2, skill, new_action), alpha)
        self._step(("policy",), policy_loss)

        alpha_loss = sac_alpha_loss(self.log_alpha, log_prob, self.target_entropy)
        self._step(("alpha",), alpha_loss)

        soft_update_params(self.critic1, self.critic1_target, cfg.tau)
        soft_update_params(self.critic2, self.critic2_target, cfg.tau)

        metrics = {
            **{k: v for k, v in model_out.items() if k != "loss"},
            "lambda": wm.log_lambda.exp(),  # after its step
            "alpha": self.log_alpha.exp(),
            "policy_entropy": -log_prob.mean(),
            "policy_std": dist.stddev.mean(),
            "q_loss": q_loss,
            "q1_mean": q1.mean(),
            "q_target_mean": target.mean(),
            "policy_loss": policy_loss,
            "alpha_loss": alpha_loss,
            "intrinsic_reward_mean": sac_reward.mean(),
            "intrinsic_reward_std": sac_reward.std() if sac_reward.numel() > 1 else torch.zeros(()),
        }
        return scalar_metrics(metrics, self.device)  # tensors: no host sync per update

    def extra_state(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state.get("env_steps", 0))
