"""The agent protocol shared by every agent family (DESIGN.md, "agents — one protocol").

An :class:`Agent` owns its world model, its networks and optimizers, and turns a replay batch into
an update. What a robot needs at run time is a :class:`Policy`: stateful, batched, fed one newest
frame at a time, owning its frame stack, belief and skill. Zero-shot tasks are given to
:meth:`Agent.infer_task` as :class:`RewardSamples` or :class:`GoalObservation` and come back as a
:class:`Task` that :meth:`Agent.policy` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel

__all__ = [
    "Agent",
    "GoalObservation",
    "Policy",
    "RewardSamples",
    "SampleSpec",
    "Task",
    "UniformRandomPolicy",
    "UnsupportedTaskError",
    "FrameStack",
]


@dataclass
class SampleSpec:
    """What :meth:`Agent.update` needs from the replay buffer.

    The fields are :meth:`latentrl.replay.ReplayBuffer.sample`'s arguments, so
    ``buffer.sample(**dataclasses.asdict(agent.sample_spec()))`` gives an update batch.
    """

    batch_size: int
    """Transitions (or slices) per update batch."""
    frame_stack: int = 1
    """Frames stacked along channels in ``pixels`` (oldest first), clamped at episode starts."""
    horizon: int = 1
    """1 for transitions ``[B]``; L > 1 for contiguous slices ``[B, L]`` within one episode."""
    goal: Literal["future", "random"] | None = None
    """Adds a ``goal`` sub-TensorDict: a later state of the same episode, or any stored state."""
    keys: tuple[str, ...] | None = None
    """Observation keys to return (``None``: all stored keys)."""


@dataclass
class RewardSamples:
    """A reward task given by examples: next observations ``obs`` ``[N]`` and their rewards ``[N, 1]``."""

    obs: TensorDict
    reward: Tensor


@dataclass
class GoalObservation:
    """A goal task: ``obs`` is a TensorDict ``[num_envs]`` holding a goal frame and/or state."""

    obs: TensorDict


@dataclass
class Task:
    """What :meth:`Agent.infer_task` returns and :meth:`Agent.policy` consumes.

    ``z`` is the agent's task embedding (TD-JEPA's z, METRA's goal latent, ...), ``goal`` an optional
    goal observation the policy keeps comparing against, ``info`` anything else the agent needs.
    """

    z: Tensor | None = None
    goal: TensorDict | None = None
    info: dict[str, Any] = field(default_factory=dict)


class UnsupportedTaskError(ValueError):
    """An agent was asked for a kind of task it cannot represent (e.g. a reward task for RND)."""


class FrameStack:
    """Keeps the last ``k`` frames per env and returns them concatenated along channels.

    After :meth:`reset` (all envs or a mask) the stack is refilled with the next frame, which is
    the same clamping as :meth:`ReplayBuffer.sample` does at episode starts.
    """

    def __init__(self, k: int):
        self.k = k
        self._frames: Tensor | None = None  # [N, k, C, H, W]
        self._fresh: Tensor | None = None  # [N] bool: refill on next push

    def reset(self, mask: Tensor | None = None) -> None:
        if self._fresh is None or mask is None:
            self._frames, self._fresh = None, None
        else:
            self._fresh |= mask.reshape(-1).to(self._fresh.device)

    def __call__(self, frame: Tensor) -> Tensor:
        """``frame`` ``[N, C, H, W]`` -> stacked ``[N, k*C, H, W]`` (oldest first)."""
        if self.k == 1:
            return frame
        if self._frames is None or self._frames.shape[0] != frame.shape[0]:
            self._frames = frame.unsqueeze(1).repeat(1, self.k, 1, 1, 1)
            self._fresh = torch.zeros(frame.shape[0], dtype=torch.bool, device=frame.device)
        else:
            self._frames = torch.cat([self._frames[:, 1:], frame.unsqueeze(1)], dim=1)
            if self._fresh.any():
                self._frames[self._fresh] = frame[self._fresh].unsqueeze(1).expand(-1, self.k, -1, -1, -1)
                self._fresh.zero_()
        return self._frames.flatten(1, 2)


class Policy:
    """A stateful, batched policy: what control loops and evaluation hold.

    Subclasses implement :meth:`act`; this base class owns the frame stack so that a robot camera
    can feed single frames. ``__call__`` runs without gradients.
    """

    def __init__(self, frame_stack: int = 1):
        self.frame_stack = FrameStack(frame_stack)

    def reset(self, mask: Tensor | None = None) -> None:
        """Forget per-episode state, for all envs or where ``mask`` ``[N]`` is true."""
        self.frame_stack.reset(mask)

    def stack(self, obs: TensorDict) -> TensorDict:
        """Return ``obs`` with ``pixels`` replaced by the stacked frames (a shallow copy)."""
        if "pixels" not in obs.keys():
            return obs
        out = obs.copy()
        out["pixels"] = self.frame_stack(obs["pixels"])
        return out

    def act(self, obs: TensorDict) -> Tensor:
        """Actions ``[N, A]`` in [-1, 1] from observations with stacked ``pixels``."""
        raise NotImplementedError

    def extras(self) -> dict[str, Tensor]:
        """Per-env tensors ``[N, ...]`` stored with each collected step (e.g. METRA's ``skill``)."""
        return {}

    @torch.no_grad()
    def __call__(self, obs: TensorDict) -> Tensor:
        return self.act(self.stack(obs))


class UniformRandomPolicy(Policy):
    """Uniform random actions in [-1, 1]: the baseline for coverage, goal reaching and zero-shot returns."""

    def __init__(self, action_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.action_dim = action_dim
        self.generator = generator

    def act(self, obs: TensorDict) -> Tensor:
        return torch.rand(obs.batch_size[0], self.action_dim, generator=self.generator) * 2.0 - 1.0


class Agent(nn.Module):
    """Base class of every agent; see DESIGN.md for the contract.

    Subclasses set ``world_model`` and implement :meth:`sample_spec`, :meth:`update`,
    :meth:`policy` and, where they support zero-shot tasks, :meth:`infer_task`.
    """

    world_model: WorldModel
    name: str = "agent"
    env_steps: int = 0
    """Env steps collected so far (all envs together); the trainer keeps it current."""

    # Construction from a config dataclass with an ``obs_type`` field ("pixels" | "state") and named
    # presets; agents that follow the constructor ``cls(config, obs_shape, action_dim, device=...)``
    # get make_config / from_env / required_obs from here.
    config_class: type | None = None
    presets: dict[str, dict[str, Any]] = {"paper": {}}
    pixel_presets: dict[str, dict[str, Any]] = {}
    """Values applied on top of a preset when the agent reads pixels."""
    state_presets: dict[str, dict[str, Any]] = {}
    """Values applied on top of a preset when the agent reads states."""

    @classmethod
    def make_config(cls, preset: str = "paper", **overrides: Any):
        """The config of ``preset`` (plus the pixel / state preset values for its ``obs_type``) and overrides."""
        if cls.config_class is None:
            raise NotImplementedError(f"{cls.__name__} sets no config_class")
        field_default = cls.config_class.__dataclass_fields__["obs_type"].default
        obs_type = overrides.get("obs_type", cls.presets.get(preset, {}).get("obs_type", field_default))
        extra = cls.pixel_presets if obs_type == "pixels" else cls.state_presets
        presets = {name: {**values, **extra.get(name, {})} for name, values in cls.presets.items()}
        return config_from_preset(cls.config_class, presets, preset, overrides)

    @classmethod
    def from_env(cls, env, *, preset: str = "paper", device: str = "cpu", **overrides: Any) -> Agent:
        """Build from a TorchRL env's specs: ``pixels`` ``[*, 3, H, W]`` or ``state`` ``[*, D]``; actions
        ``[*, A]`` in [-1, 1]."""
        config = cls.make_config(preset, **overrides)
        spec = env.observation_spec
        key = config.obs_type
        if key not in spec.keys():
            other = [k for k in ("pixels", "state") if k in spec.keys()]
            hint = f" or pass obs_type={other[0]!r}" if other else ""
            raise ValueError(
                f"{cls.name} with obs_type={key!r} needs the env to observe {key!r}, but its observation keys are "
                f"{sorted(map(str, spec.keys()))}; build it with make_env(..., obs=({key!r},)){hint}"
            )
        obs_shape = tuple(spec[key].shape[-3:]) if key == "pixels" else (spec[key].shape[-1],)
        return cls(config, obs_shape, env.action_spec.shape[-1], device=device)

    @classmethod
    def required_obs(cls, preset: str = "paper", **overrides: Any) -> tuple[str, ...]:
        """Observation keys the agent reads with these settings (the trainer builds its env with them)."""
        if cls.config_class is None:
            return ("pixels",)
        return (cls.make_config(preset, **overrides).obs_type,)

    def sample_spec(self) -> SampleSpec:
        raise NotImplementedError

    def update(self, batch: TensorDict) -> dict[str, float]:
        """One gradient update from a replay batch; returns scalar metrics for logging."""
        raise NotImplementedError

    def policy(self, task: Task | None = None, *, explore: bool = False) -> Policy:
        raise NotImplementedError

    def infer_task(self, spec: RewardSamples | GoalObservation) -> Task:
        raise UnsupportedTaskError(
            f"agent {self.name!r} does not infer zero-shot tasks ({type(spec).__name__} given); "
            "use an agent that does (td_jepa, fb, metra for goals)"
        )

    def evaluate(self, env, *, step: int, out_dir) -> dict[str, float]:
        """Agent-specific evaluation the trainer runs at every evaluation (e.g. METRA's state coverage);
        ``env`` is the evaluation env, ``out_dir`` a folder for plots. Returns metrics to log."""
        del env, step, out_dir
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers, saved and restored with checkpoints."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter training state (running statistics, counters) for checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        del state


def config_from_preset(config_cls: type, presets: dict[str, dict[str, Any]], preset: str, overrides: dict[str, Any]):
    """Build an agent config dataclass from a named preset plus overrides, refusing unknown names."""
    import dataclasses
    import difflib

    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {config_cls.__name__}; valid presets: {', '.join(presets)}")
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {**presets[preset], **overrides}
    unknown = sorted(set(values) - names)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=2, cutoff=0.5)
            hints.append(f"{key!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise ValueError(
            f"unknown {config_cls.__name__} field(s): {', '.join(hints)}. Valid fields: {', '.join(sorted(names))}"
        )
    return config_cls(**values)
