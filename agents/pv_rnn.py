"""The PV-RNN agent: error regression online, GLean planning for goals, a PD controller for torques
(``shared/algorithms/pv_rnn.md``; the model: :mod:`latentrl.world_models.pv_rnn`).

- **Learning** (:meth:`PVRNNAgent.update`): full-sequence BPTT on replay slices ``[B, T]`` jointly over
  the network weights (Adam) and the adaptive vectors of the batch's segments (per-entry Adam in
  :class:`~latentrl.world_models.pv_rnn.AdaptiveVectors`, same learning rate, spec §10), keyed by the
  buffer's ``segment_id`` / ``segment_step``. With ``seq_len`` equal to the episode length every slice is
  a whole episode, the spec's setting. Pixels: the frozen-after-pretraining autoencoder's loss is
  minimised during the first ``autoencoder_updates`` updates.
- **Acting** (:class:`PVRNNPolicy`): the carry holds the error-regression window (the last
  ``er_window`` modelled vectors, their adaptive vectors, which steps are valid) and the belief
  (``h``, ``d`` per layer) at the window's start. Each step slides the window (the dropped step's
  posterior mean advances the start belief), appends the new observation with its adaptive vector set
  to the prior's pre-activation, runs ``er_iters`` Adam steps of error regression on the window's
  vectors only, predicts the next modelled vector from the prior mean, and sends the predicted
  proprioceptive target through a PD controller: ``a = clip(kp (q_target - q) - kd qdot, -1, 1)``.
- **Goals** (:meth:`PVRNNAgent.infer_task`): GLean planning (accuracy on the goal step, and on the
  start step when the goal observation holds ``"start"``); the task holds the planned trajectory
  ``[N, plan_horizon, x_dim]`` and the policy tracks it with the PD controller (the window's error
  regression still runs, with ``plan_er_iters`` iterations). Reward tasks are not representable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor

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
from latentrl.world_models.layers import data_parallel_world_size, make_adam
from latentrl.world_models.pv_rnn import AdaptiveVectors, PVRNNModel

__all__ = ["PRESETS", "PVRNNAgent", "PVRNNConfig", "PVRNNPolicy", "pd_control"]

OBS_TYPES = ("pixels", "state")


@dataclass
class PVRNNConfig:
    """PV-RNN hyperparameters; defaults: spec §11 Setting B (dm_control reacher, CPU)."""

    obs_type: Literal["pixels", "state"] = "state"
    """Observation read: ``state`` (the modelled dims ``model_dims``) or ``pixels`` (autoencoder latent)."""
    d_sizes: list[int] = field(default_factory=lambda: [40, 20])
    """Deterministic units per layer, bottom (fast) first."""
    z_sizes: list[int] = field(default_factory=lambda: [4, 2])
    """Stochastic latent units per layer."""
    taus: list[float] = field(default_factory=lambda: [2.0, 8.0])
    """Time constants per layer (fast at the bottom, slow at the top)."""
    meta_prior: list[float] = field(default_factory=lambda: [1e-3, 1e-3])
    """Meta-prior w per layer: the weight of the dimension-normalised KL at t >= 2."""
    w1: list[float] = field(default_factory=lambda: [0.01, 0.01])
    """KL weight at an episode's first step (the unit-Gaussian prior; GLean's ugaussian_weight)."""
    recon_weight: float = 1.0
    """Weight of the squared-error reconstruction against the KL (1: OT / pvrnn_sa; ~10 gives GLean's
    softmax-code balance on data in [0, 1], see :class:`~latentrl.world_models.pv_rnn.PVRNNModel`)."""
    model_dims: list[int] | None = None
    """State indices the model predicts (``None``: all); reacher: ``[0, 1]`` (joint angles)."""
    control_dims: list[int] | None = None
    """Indices of the modelled vector that are the joint targets, one per action (``None``: the first
    ``action_dim``; missing ones give zero torque)."""
    velocity_dims: list[int] | None = None
    """State indices of the joint velocities for the PD's damping (``None``: finite differences)."""
    kp: float = 5.0
    """PD proportional gain (torque per unit of position error)."""
    kd: float = 0.5
    """PD derivative gain."""
    explore_noise: float = 0.3
    """Std of Gaussian noise added to the torque when exploring."""
    num_sequences: int = 64
    """Rows of adaptive vectors (training segments held at once; the oldest is recycled beyond)."""
    max_steps: int = 64
    """Steps of adaptive vectors kept per segment (>= the longest trained episode)."""
    seq_len: int = 50
    """Slice length sampled for training (set to the episode length for full-sequence BPTT)."""
    batch_size: int = 64
    """Slices per update (the spec trains full batch: all training sequences)."""
    lr: float = 1e-3
    """Adam rate of the weights and of the adaptive vectors."""
    er_window: int = 10
    """Error-regression window W (steps)."""
    er_iters: int = 10
    """Error-regression Adam iterations per control step."""
    er_lr: float = 0.09
    """Error-regression Adam rate (pvrnn_sa: 0.09)."""
    plan_horizon: int = 50
    """Planned steps (the training sequence length)."""
    plan_iters: int = 500
    """GLean planning iterations."""
    plan_lr: float = 0.05
    """GLean planning Adam rate."""
    plan_candidates: int = 8
    """Adaptive-vector sequences optimised in parallel per goal; the lowest free energy is kept."""
    plan_sample: bool = False
    """Plan with sampled z (GLean's protocol; the plan is one sample) instead of posterior means."""
    plan_rec_weighting: float = 0.0
    """GLean's planning_auto_weight: > 0 scales the start/goal accuracy by horizon x this / 3 (0: off)."""
    plan_er_iters: int = 0
    """Error-regression iterations per step while following a plan."""
    goal_dims: list[int] | None = None
    """Modelled dims the goal constrains (``None``: all); the others are masked (GLean goal masks)."""
    pixel_latent_dim: int = 16
    """Pixels: the autoencoder latent size (the modelled vector)."""
    autoencoder_depth: int = 16
    """Pixels: channels of the autoencoder's first conv layer."""
    autoencoder_updates: int = 2000
    """Pixels: updates during which the autoencoder trains; frozen afterwards."""

    def __post_init__(self) -> None:
        if self.obs_type not in OBS_TYPES:
            raise ValueError(f"PVRNNConfig.obs_type must be one of {OBS_TYPES}, got {self.obs_type!r}")
        for name in ("d_sizes", "z_sizes", "taus", "meta_prior", "w1", "model_dims", "control_dims",
                     "velocity_dims", "goal_dims"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, list(value))
        n = len(self.d_sizes)
        if any(len(getattr(self, k)) != n for k in ("z_sizes", "taus", "meta_prior", "w1")):
            raise ValueError("PVRNNConfig: d_sizes, z_sizes, taus, meta_prior and w1 need one entry per layer")
        for name in ("num_sequences", "max_steps", "seq_len", "batch_size", "er_window", "plan_horizon",
                     "plan_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"PVRNNConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len > self.max_steps:
            raise ValueError(f"seq_len ({self.seq_len}) must be <= max_steps ({self.max_steps})")
        if self.obs_type == "pixels" and self.velocity_dims is not None:
            raise ValueError("velocity_dims index state dims; pixel observations have none")


PRESETS: dict[str, dict[str, Any]] = {
    # Spec §11 Setting B: 2 layers 40/4/2 and 20/2/8, T = 50, 64 sequences full batch, ER W = 10.
    "paper": {},
    # Cheaper online inference for a 2-core CPU: shorter ER window and fewer iterations.
    "small": {"er_window": 5, "er_iters": 5, "plan_iters": 200, "plan_candidates": 4},
    # Tiny, for tests.
    "smoke": {"d_sizes": [8, 4], "z_sizes": [2, 1], "num_sequences": 16, "max_steps": 32, "seq_len": 6,
              "batch_size": 4, "er_window": 3, "er_iters": 2, "plan_horizon": 4, "plan_iters": 3,
              "plan_candidates": 2, "pixel_latent_dim": 4, "autoencoder_depth": 4, "autoencoder_updates": 5},
}


def pd_control(q: Tensor, q_target: Tensor, qdot: Tensor, kp: float, kd: float) -> Tensor:
    """``clip(kp (q_target - q) - kd qdot, -1, 1)``: torques from a position target."""
    return (kp * (q_target - q) - kd * qdot).clamp(-1.0, 1.0)


class PVRNNPolicy(Policy):
    """Error regression over a sliding window, next-step prediction, PD control; see the module docstring.

    ``plan`` ``[1 or N, H, x_dim]``: a GLean plan the PD controller tracks (``None``: follow the
    model's own prediction of the next step)."""

    uses_autograd = True

    def __init__(self, world_model: PVRNNModel, config: PVRNNConfig, action_dim: int, *, plan: Tensor | None = None,
                 explore: bool = False):
        super().__init__(world_model.obs_key, world_model.obs_shape, action_dim, frame_stack=1, explore=explore)
        self.world_model = world_model
        self.config = config
        x_dim = world_model.x_dim
        ctrl = config.control_dims if config.control_dims is not None else list(range(min(action_dim, x_dim)))
        if len(ctrl) > action_dim or (ctrl and (min(ctrl) < 0 or max(ctrl) >= x_dim)):
            raise ValueError(f"control_dims {ctrl} must be at most {action_dim} indices into the {x_dim} modelled "
                             "dims")
        self.register_buffer("control_dims", torch.tensor(ctrl, dtype=torch.int64))
        vel = config.velocity_dims
        if vel is not None and len(vel) != len(ctrl):
            raise ValueError(f"velocity_dims {vel} needs one index per control dim {ctrl}")
        self.register_buffer("velocity_dims", None if vel is None else torch.tensor(vel, dtype=torch.int64))
        if plan is not None:
            plan = plan.detach().to(self.device, torch.float32)
            plan = plan.unsqueeze(0) if plan.dim() == 2 else plan
            if plan.dim() != 3 or plan.shape[-1] != x_dim:
                raise ValueError(f"a PV-RNN plan is [N, H, {x_dim}], got {list(plan.shape)}")
        self.register_buffer("plan", plan)

    def init_carry(self, batch_size: int) -> TensorDict:
        carry = super().init_carry(batch_size)
        wm, w = self.world_model, self.config.er_window
        n, dev = int(batch_size), self.device
        state = wm.initial_state(n)
        for key in wm._core(state):
            carry[key] = state[key]
        carry["start_steps"] = torch.zeros(n, dtype=torch.int64, device=dev)
        carry["x"] = torch.zeros(n, w, wm.x_dim, device=dev)
        carry["valid"] = torch.zeros(n, w, dtype=torch.bool, device=dev)
        carry["adaptive"] = torch.zeros(n, w, wm.adaptive_dim, device=dev)
        carry["prev_x"] = torch.zeros(n, wm.x_dim, device=dev)
        carry["x_hat"] = torch.zeros(n, wm.x_dim, device=dev)
        carry["t"] = torch.zeros(n, dtype=torch.int64, device=dev)
        return carry

    def act(self, obs: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        wm, cfg = self.world_model, self.config
        n = obs.shape[0]
        x = wm.features(obs)
        core = {k: carry[k] for k in wm._core(carry)}
        with torch.no_grad():  # slide: the dropped step's posterior mean advances the start belief
            full = carry["valid"][:, 0]
            if bool(full.any()):
                new, _, _, _ = wm.step(core, carry["adaptive"][:, 0], carry["start_steps"] == 0, sample=False)
                core = {k: torch.where(full.reshape(-1, 1), new[k], v) for k, v in core.items()}
        start_steps = carry["start_steps"] + full.long()
        xs = torch.cat([carry["x"][:, 1:], x.unsqueeze(1)], dim=1)
        valid = torch.cat([carry["valid"][:, 1:], torch.ones(n, 1, dtype=torch.bool, device=x.device)], dim=1)
        adaptive = torch.cat([carry["adaptive"][:, 1:], torch.zeros_like(carry["adaptive"][:, :1])], dim=1)
        fresh = torch.zeros_like(valid)
        fresh[:, -1] = True
        window = TensorDict({"x": xs, "valid": valid, "adaptive": adaptive, "fresh": fresh},
                            batch_size=[n, valid.shape[1]])
        state = TensorDict({**core, "steps": start_steps}, batch_size=[n])
        iters = cfg.er_iters if self.plan is None else cfg.plan_er_iters
        out = wm.infer(window, state, iters)
        t = carry["t"]
        if self.plan is not None:
            plan = self.plan.expand(n, -1, -1) if self.plan.shape[0] == 1 else self.plan
            if plan.shape[0] != n:
                raise ValueError(f"the plan holds {plan.shape[0]} goals but the observation has {n} envs")
            index = (t + 1).clamp(max=plan.shape[1] - 1)
            target = plan[torch.arange(n, device=x.device), index]
        else:
            target = out["x_hat"]
        ctrl = self.control_dims
        if self.velocity_dims is not None:
            qdot = obs[:, self.velocity_dims].float()
        else:
            qdot = torch.where((t > 0).reshape(-1, 1), x - carry["prev_x"], torch.zeros_like(x))[:, ctrl]
        torque = pd_control(x[:, ctrl], target[:, ctrl], qdot, cfg.kp, cfg.kd)
        action = torch.zeros(n, self.action_dim, device=x.device)
        action[:, : len(ctrl)] = torque
        if self.explore:
            action = (action + cfg.explore_noise * torch.randn_like(action)).clamp(-1.0, 1.0)
        carry = carry.clone(False)
        for key in core:
            carry[key] = core[key]
        carry["start_steps"], carry["x"], carry["valid"] = start_steps, xs, valid
        carry["adaptive"], carry["prev_x"], carry["x_hat"], carry["t"] = out["adaptive"], x, out["x_hat"], t + 1
        return action.detach(), carry


class PVRNNAgent(Agent):
    """The PV-RNN agent; build it with :meth:`from_env` or ``make_agent("pv_rnn", env)``."""

    name = "pv_rnn"
    config_class = PVRNNConfig
    presets = PRESETS
    inference_modules = ("world_model",)

    def __init__(self, config: PVRNNConfig, obs_shape: tuple[int, ...], action_dim: int,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.config = cfg = config
        self.device = resolve_device(device)
        self.obs_shape = check_obs_shape(cfg.obs_type, obs_shape)
        self.action_dim = int(action_dim)
        self.env_steps = 0
        self.obs_key = cfg.obs_type
        self.world_model = PVRNNModel(
            cfg.obs_type, self.obs_shape, d_sizes=cfg.d_sizes, z_sizes=cfg.z_sizes, taus=cfg.taus,
            meta_prior=cfg.meta_prior, w1=cfg.w1, model_dims=cfg.model_dims, pixel_latent_dim=cfg.pixel_latent_dim,
            autoencoder_depth=cfg.autoencoder_depth, er_iters=cfg.er_iters, er_lr=cfg.er_lr,
            recon_weight=cfg.recon_weight)
        self.adaptive_vectors = AdaptiveVectors(cfg.num_sequences, cfg.max_steps, self.world_model.adaptive_dim)
        self.register_buffer("autoencoder_steps", torch.zeros((), dtype=torch.int64))
        self.to(self.device)
        ae = self.world_model.autoencoder
        ae_params = set() if ae is None else {id(p) for p in ae.parameters()}
        self._optimizer = make_adam([p for p in self.world_model.parameters() if id(p) not in ae_params], lr=cfg.lr)
        self._ae_optimizer = None if ae is None else make_adam(ae.parameters(), lr=1e-3)

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(batch_size=self.config.batch_size, horizon=self.config.seq_len, keys=(self.obs_key,))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = {"model": self._optimizer}
        if self._ae_optimizer is not None:
            out["autoencoder"] = self._ae_optimizer
        return out

    # ---------------------------------------------------------------------------------- tasks
    def policy(self, task: Task | None = None, *, explore: bool = False) -> PVRNNPolicy:
        plan = None
        if task is not None:
            if task.info.get("kind") != "plan" or task.z is None:
                raise UnsupportedTaskError("the PV-RNN policy takes a GLean plan (agent.infer_task(GoalObservation)) "
                                           "or no task (it follows its own predictions)")
            plan = task.z
        return PVRNNPolicy(self.world_model, self.config, self.action_dim, plan=plan, explore=explore)

    def infer_task(self, spec: RewardSamples | GoalObservation, *, generator: torch.Generator | None = None) -> Task:
        """GLean planning toward ``spec.obs[obs_key]`` ``[N, ...]`` (optionally from ``spec.obs["start"]``):
        ``Task(z=plan [N, plan_horizon, x_dim], info={"kind": "plan", "goal_error": ...})``."""
        if not isinstance(spec, GoalObservation):
            raise UnsupportedTaskError(f"pv_rnn plans toward goal observations (GLean); it cannot represent "
                                       f"{type(spec).__name__}")
        key, cfg, wm = self.obs_key, self.config, self.world_model
        if key not in spec.obs.keys():
            raise KeyError(f"pv_rnn (obs_type={key!r}) needs the goal observation to hold {key!r}; it has keys "
                           f"{sorted(map(str, spec.obs.keys()))}")
        goal = wm.features(spec.obs[key].to(self.device))
        start = None
        if "start" in spec.obs.keys():
            start = wm.features(spec.obs["start", key].to(self.device))
        mask = None
        if cfg.goal_dims is not None:
            mask = torch.zeros(wm.x_dim, device=self.device)
            mask[cfg.goal_dims] = 1.0
        out = wm.plan(goal, cfg.plan_horizon, start=start, goal_mask=mask, candidates=cfg.plan_candidates,
                      iters=cfg.plan_iters, lr=cfg.plan_lr, generator=generator, sample=cfg.plan_sample,
                      rec_weighting=cfg.plan_rec_weighting)
        return Task(z=out["x_hat"], goal=spec.obs.select(key).clone(),
                    info={"kind": "plan", "goal_error": out["goal_error"].tolist()})

    # --------------------------------------------------------------------------------- update
    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        batch = batch.to(self.device)
        if batch.batch_dims == 1:
            batch = batch.unsqueeze(1)
        metrics: dict[str, Tensor] = {}
        wm = self.world_model
        if wm.autoencoder is not None and int(self.autoencoder_steps) < self.config.autoencoder_updates:
            ae_loss = wm.autoencoder.loss(batch[self.obs_key])
            self._ae_optimizer.zero_grad(set_to_none=True)
            ae_loss.backward()
            self._ae_optimizer.step()
            self.autoencoder_steps += 1
            metrics["autoencoder_loss"] = ae_loss.detach()
        rows = self.adaptive_vectors.rows(batch["segment_id"][:, 0])
        steps = batch["segment_step"]
        adaptive = self.adaptive_vectors.gather(rows, steps)
        out = wm.loss(batch, adaptive=adaptive)
        self._optimizer.zero_grad(set_to_none=True)
        self.adaptive_vectors.values.grad = None
        # The loss sums over rows: under data parallelism each rank's share counts world_size times, so that the
        # averaged gradients (and the adaptive vectors' gathered ones) are those of the global batch's sum.
        (out["loss"] * data_parallel_world_size()).backward()
        self._optimizer.step()
        self.adaptive_vectors.adam_step(rows, steps, self.config.lr)
        metrics.update({k: v for k, v in out.items()})
        return scalar_metrics(metrics, self.device)  # tensors: no host sync per update

    def extra_state(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state.get("env_steps", 0))


# ------------------------------------------------------------------------------ data (Setting A)

BRANCH_START, BRANCH_POINT = (0.05, 0.05), (0.38, 0.42)
BRANCH_GOALS = {"left": (0.2, 0.8), "right": (0.85, 0.3)}


def branching_paths(num: int, steps: int = 30, *, branch_step: int = 10, noise: float = 0.02,
                    generator: torch.Generator | None = None, sides: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GLean Exp. 1's branching 2-D paths, synthesised (spec §7): ``num`` XY trajectories ``[num, steps, 2]``
    in [0, 1]^2 from near (0, 0) through the branch point (0.38, 0.42) at ``branch_step`` to the left
    (0.2, 0.8) or right (0.85, 0.3) goal area, half each (or ``sides``: bool ``[num]``, True = left).
    Each path bends through a jittered midpoint and carries small smooth noise. Returns the paths and
    ``left`` (bool ``[num]``)."""
    g = generator
    left = (torch.arange(num) % 2 == 0) if sides is None else sides.bool()
    start = torch.tensor(BRANCH_START) + noise * torch.randn(num, 2, generator=g)
    branch = torch.tensor(BRANCH_POINT) + noise * torch.randn(num, 2, generator=g)
    goals = torch.where(left[:, None], torch.tensor(BRANCH_GOALS["left"]), torch.tensor(BRANCH_GOALS["right"]))
    goals = goals + 1.5 * noise * torch.randn(num, 2, generator=g)
    bend = 0.08 * torch.randn(num, 2, generator=g)

    def segment(a: Tensor, b: Tensor, n: int, curve: Tensor) -> Tensor:
        s = torch.linspace(0, 1, n + 1)[1:].reshape(1, n, 1)
        eased = 0.5 - 0.5 * torch.cos(torch.pi * s)
        return a[:, None] + (b - a)[:, None] * eased + curve[:, None] * torch.sin(torch.pi * s)

    first = torch.cat([start[:, None], segment(start, branch, branch_step - 1, 0.3 * bend)], dim=1)
    second = segment(branch, goals, steps - branch_step, bend)
    paths = torch.cat([first, second], dim=1)
    jitter = torch.cumsum(0.3 * noise * torch.randn(num, steps, 2, generator=g), dim=1) * 0.3
    return (paths + jitter).clamp(0.0, 1.0), left


def branch_side(paths: Tensor) -> Tensor:
    """Whether each path ``[N, T, 2]`` ends nearer the left goal than the right one (bool ``[N]``)."""
    end = paths[:, -1]
    d_left = (end - torch.tensor(BRANCH_GOALS["left"], device=end.device)).norm(dim=-1)
    d_right = (end - torch.tensor(BRANCH_GOALS["right"], device=end.device)).norm(dim=-1)
    return d_left < d_right
