"""The z-conditioned zero-shot agents' shared parts (TD-JEPA, FB): actor, policy and agent base.

- :class:`ZConditionedActor`: the task-conditioned actor ``pi(latent, z)``.
- :class:`ZPolicy`: its policy, ``z`` held per episode in the carry.
- :class:`ZeroShotAgent`: the agent base (construction from presets, ``sample_spec``, ``policy``,
  ``infer_task``) over a :class:`~latentrl.world_models.zero_shot.ZeroShotModel`.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.agents.actor_critic import TruncatedNormal
from latentrl.agents.base import (
    Agent,
    GoalObservation,
    Policy,
    RewardSamples,
    SampleSpec,
    Task,
    UnsupportedTaskError,
    resolve_device,
)
from latentrl.world_models.layers import mlp
from latentrl.world_models.sphere import project_to_sphere, sample_sphere
from latentrl.world_models.zero_shot import ZeroShotModel, mlp_embedding

__all__ = ["ZConditionedActor", "ZPolicy", "ZeroShotAgent", "check_zero_shot_config", "heldout_linear_r2"]


class ZConditionedActor(nn.Module):
    """The TD-JEPA / FB actor ``pi(latent, z)`` (the reference code's ``simple`` actor).

    ``embed_z(latent || z)`` and ``embed_s(latent)`` (each Linear-LayerNorm-Tanh then Linear-ReLU to
    ``hidden_dim / 2``) are concatenated, then ``hidden_layers`` x Linear-ReLU and a Linear give the
    mean ``tanh(.)``; ``forward(latent [B, D], z [B, d], std)`` returns a :class:`TruncatedNormal` on
    [-1, 1] with that fixed ``std``.
    """

    def __init__(self, latent_dim: int, z_dim: int, action_dim: int, hidden_dim: int = 1024,
                 hidden_layers: int = 1, embedding_layers: int = 2):
        super().__init__()
        self.embed_z = mlp_embedding(latent_dim + z_dim, hidden_dim, embedding_layers)
        self.embed_s = mlp_embedding(latent_dim, hidden_dim, embedding_layers)
        self.policy = mlp(2 * (hidden_dim // 2), [hidden_dim] * hidden_layers, action_dim)

    def forward(self, latent: Tensor, z: Tensor, std: float) -> TruncatedNormal:
        embedding = torch.cat([self.embed_s(latent), self.embed_z(torch.cat([latent, z], dim=-1))], dim=-1)
        mu = torch.tanh(self.policy(embedding))
        return TruncatedNormal(mu, torch.full_like(mu, std))


class ZPolicy(Policy):
    """A policy ``pi(phi(s), z)`` holding one task vector ``z`` per env for a whole episode.

    Holds the state encoder ``phi`` and the actor (shared with the agent). With a task, ``z`` is the
    task's (``task_z``: ``[1, d]`` for every env, or ``[num_envs, d]``), a buffer saved with the
    policy; without one, each env draws ``z`` uniformly on the sphere of radius ``sqrt(d)`` at its
    episode's first step (the pre-training prior, in :meth:`start_episode`). The carry holds ``z``
    ``[N, d]`` and the frame stack.
    ``explore`` samples the actor's noise (``actor_std``); otherwise the deterministic mean acts.
    """

    def __init__(self, encoder: nn.Module, actor: ZConditionedActor, *, obs_key: str, obs_shape: tuple[int, ...],
                 frame_stack: int, action_dim: int, z_dim: int, actor_std: float, z: Tensor | None = None,
                 explore: bool = False):
        super().__init__(obs_key, obs_shape, action_dim, frame_stack=frame_stack, explore=explore)
        self.encoder, self.actor = encoder, actor
        self.z_dim, self.actor_std = int(z_dim), float(actor_std)
        if z is not None:
            z = z.detach().to(self.device, torch.float32)
            z = z.reshape(1, -1) if z.dim() == 1 else z
            if z.dim() != 2 or z.shape[-1] != self.z_dim:
                raise ValueError(f"task z must be [{self.z_dim}] or [num_envs, {self.z_dim}], got {list(z.shape)}")
        self.register_buffer("task_z", z)

    @property
    def z(self) -> Tensor | None:
        """The task vectors ``[num_envs, d]`` of the convenience call's running episodes."""
        return None if self.carry is None else self.carry["z"]

    def init_carry(self, batch_size: int) -> TensorDict:
        carry = super().init_carry(batch_size)
        if self.task_z is None:  # drawn by start_episode at each env's first step
            carry["z"] = torch.zeros(batch_size, self.z_dim, device=self.device)
        elif self.task_z.shape[0] in (1, batch_size):
            carry["z"] = self.task_z.expand(batch_size, -1).clone()
        else:
            raise ValueError(f"the task holds {self.task_z.shape[0]} task vectors but the observation has "
                             f"{batch_size} envs; infer one per env or a single one")
        return carry

    def start_episode(self, batch_size: int) -> TensorDict:
        carry = self.init_carry(batch_size)
        if self.task_z is None:
            carry["z"] = sample_sphere(batch_size, self.z_dim, device=self.device)
        return carry

    def _restart_rows(self, carry: TensorDict, is_first: Tensor) -> TensorDict:
        if self.task_z is None or self.task_z.shape[0] == 1:
            return super()._restart_rows(carry, is_first)
        if self.task_z.shape[0] != carry.batch_size[0]:
            self.init_carry(carry.batch_size[0])  # raises the error that names the mismatch
        carry = carry.clone(False)  # per-env task vectors: a restarted row takes its own again
        carry["z"] = torch.where(is_first.reshape(-1, 1), self.task_z, carry["z"])
        return carry

    def act(self, x: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        dist = self.actor(self.encoder(x), carry["z"], self.actor_std)
        return (dist.sample() if self.explore else dist.mean), carry


def check_zero_shot_config(config: Any, pairs_why: str) -> None:
    """The checks shared by the zero-shot agents' configs (TD-JEPA, FB): ``obs_type``, ``frame_stack``,
    ``batch_size`` (>= 2, since ``pairs_why``) and ``train_goal_ratio``; errors name the config class."""
    name = type(config).__name__
    if config.obs_type not in ("pixels", "state"):
        raise ValueError(f"{name}.obs_type must be 'pixels' or 'state', got {config.obs_type!r}")
    if config.frame_stack < 1:
        raise ValueError(f"{name}.frame_stack must be >= 1, got {config.frame_stack}")
    if config.batch_size < 2:
        raise ValueError(f"{name}.batch_size must be >= 2 ({pairs_why}), got {config.batch_size}")
    if not 0.0 <= config.train_goal_ratio <= 1.0:
        raise ValueError(f"{name}.train_goal_ratio must be in [0, 1], got {config.train_goal_ratio}")


def heldout_linear_r2(features: Tensor, reward: Tensor, seed: int = 0) -> float:
    """How much of a reward the task features explain linearly: the R^2, on a held-out random half of
    the samples, of the least-squares fit ``features @ w ~ reward`` made on the other half.

    ``features`` ``[N, d]``, ``reward`` ``[N, 1]``. TD-JEPA's health check (spec §12.5) wants it > 0
    for every task; near 1 the reward lies in the span of the features. NaN with fewer than
    ``2 * (d + 1)`` samples.
    """
    n, d = features.shape
    if n < 2 * (d + 1):
        return float("nan")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(features.device)
    fit, held = order[: n // 2], order[n // 2:]
    x, r = features.double(), reward.double().reshape(-1, 1)
    w = torch.linalg.lstsq(x[fit], r[fit]).solution
    residual = ((x[held] @ w - r[held]) ** 2).sum()
    total = ((r[held] - r[held].mean()) ** 2).sum()
    return float(1.0 - residual / total) if total > 0 else float("nan")


class ZeroShotAgent(Agent):
    """Shared by TD-JEPA and FB: a z-conditioned actor on a :class:`ZeroShotModel`, zero-shot by inference.

    Subclasses set ``config_class`` (a dataclass with ``obs_type``, ``frame_stack``, ``batch_size``,
    ``discount``, ``actor_std``), ``presets`` (``paper`` / ``small`` / ``smoke``), optional
    ``pixel_presets`` / ``state_presets`` applied on top when the agent reads pixels / states, build
    ``world_model``, ``actor`` and ``_optimizers``, and implement :meth:`update` and
    :meth:`reward_inference`. Goals are ``project(encode_task(g))``.
    """

    world_model: ZeroShotModel
    actor: ZConditionedActor
    inference_chunk_size: int = 4096
    """Observations encoded at once by :meth:`infer_task`."""

    def __init__(self, config: Any, obs_shape: tuple[int, ...], action_dim: int, device: str | torch.device = "cpu"):
        super().__init__()
        self.config = config
        self.device = resolve_device(device)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.action_dim = int(action_dim)
        expected = 3 if config.obs_type == "pixels" else 1
        if len(self.obs_shape) != expected:
            want = "a frame shape [3, H, W]" if expected == 3 else "a state shape [D]"
            raise ValueError(f"obs_type={config.obs_type!r} needs {want}, got {list(self.obs_shape)}")
        self._optimizers: dict[str, torch.optim.Optimizer] = {}

    @property
    def frame_stack(self) -> int:
        return self.config.frame_stack if self.config.obs_type == "pixels" else 1

    @property
    def model_input_shape(self) -> tuple[int, ...]:
        """``[3 * frame_stack, H, W]`` for pixels, ``[D]`` for states."""
        if self.config.obs_type == "pixels":
            c, h, w = self.obs_shape
            return (c * self.frame_stack, h, w)
        return self.obs_shape

    @property
    def z_dim(self) -> int:
        return self.world_model.z_dim

    def sample_spec(self) -> SampleSpec:
        cfg = self.config
        return SampleSpec(batch_size=cfg.batch_size, frame_stack=self.frame_stack, keys=(cfg.obs_type,))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self._optimizers)

    # ------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def target_action(self, latent: Tensor, z: Tensor) -> Tensor:
        """``a' ~ pi(latent, z)`` with the actor's clipped noise: the next action a policy-conditioned TD
        target follows (the model's ``loss(batch, next_action)`` calls it)."""
        return self.actor(latent, z, self.config.actor_std).sample(clip=self.config.stddev_clip)

    # ------------------------------------------------------------------------------------ zero-shot
    def act(self, obs: TensorDict, z: Tensor, *, mean: bool = True) -> Tensor:
        """Actions ``[N, A]`` for observations ``[N]`` (stacked pixels or states) and ``z`` ``[N, d]``."""
        with torch.no_grad():
            dist = self.actor(self.world_model.encode(obs.to(self.device)), z.to(self.device), self.config.actor_std)
            return dist.mean if mean else dist.sample()

    def policy(self, task: Task | None = None, *, explore: bool = False) -> ZPolicy:
        """``pi(., z)`` with ``z`` fixed per episode: the task's, or without a task one drawn per episode."""
        if task is not None and task.z is None:
            raise UnsupportedTaskError(f"{self.name} acts on a task vector z; get one from agent.infer_task(...)")
        wm = self.world_model
        return ZPolicy(wm.state_encoder, self.actor, obs_key=wm.obs_key, obs_shape=self.obs_shape,
                       frame_stack=self.frame_stack, action_dim=self.action_dim, z_dim=self.z_dim,
                       actor_std=self.config.actor_std, z=None if task is None else task.z, explore=explore)

    @torch.no_grad()
    def task_embedding(self, obs: TensorDict | Tensor) -> Tensor:
        """``encode_task`` (TD-JEPA's ``psi``, FB's ``B``) of observations ``[N]``, in chunks, no augmentation."""
        x = self.world_model.observation(obs)
        chunks = [self.world_model.encode_task(x[i:i + self.inference_chunk_size].to(self.device))
                  for i in range(0, x.shape[0], self.inference_chunk_size)]
        return torch.cat(chunks)

    def reward_inference(self, features: Tensor, reward: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """``z`` ``[d]`` (and extra info) from embeddings ``[N, d]`` of next states and rewards ``[N, 1]``."""
        raise NotImplementedError

    @torch.no_grad()
    def infer_task(self, spec: RewardSamples | GoalObservation) -> Task:
        """Zero-shot task vector: from next observations and their rewards, or from a goal observation.

        ``RewardSamples``: ``obs`` ``[N]`` (stacked or single pixel frames, or states) of next states
        ``s'`` and ``reward`` ``[N, 1]`` with ``r = r(s')`` (relabel them with ``ReplayBuffer.relabel``);
        ``Task.z`` is ``[d]``. ``GoalObservation``: ``Task.z`` is ``project(encode_task(g))`` ``[num_envs, d]``.
        """
        if isinstance(spec, RewardSamples):
            reward = torch.as_tensor(spec.reward).reshape(-1, 1).float()
            features = self.task_embedding(spec.obs)
            if reward.shape[0] != features.shape[0]:
                raise ValueError(f"{features.shape[0]} observations but {reward.shape[0]} rewards; give one "
                                 "reward per next observation")
            if not torch.isfinite(reward).all():
                raise ValueError("the rewards hold NaN or inf (reward-free data?): relabel the samples first "
                                 "with ReplayBuffer.relabel(get_task(name), td)")
            reward = reward.to(features.device)
            z, info = self.reward_inference(features, reward)
            return Task(z=z, info={"kind": "reward", "num_samples": int(features.shape[0]),
                                   "reward_r2": heldout_linear_r2(features, reward), **info})
        if isinstance(spec, GoalObservation):
            return Task(z=project_to_sphere(self.task_embedding(spec.obs)), goal=spec.obs, info={"kind": "goal"})
        raise UnsupportedTaskError(f"{self.name} infers tasks from RewardSamples or GoalObservation, "
                                   f"not {type(spec).__name__}")
