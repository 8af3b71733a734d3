"""The agent contracts shared by every agent family (DESIGN.md, "agents — learner and policy, split").

An agent is two things, after Meta Motivo's model / agent split:

- the learner, :class:`Agent`: world model, heads, optimizers, targets and ``update(batch)``;
  :meth:`Agent.sample_spec` names what ``update`` needs from the replay buffer (one
  :class:`SampleSpec`, or a dict of named ones), :meth:`Agent.infer_task` turns
  :class:`RewardSamples` or a :class:`GoalObservation` into a :class:`Task`, and
  :meth:`Agent.policy` returns the acting part;
- the :class:`Policy`: only what acting needs, an ``nn.Module`` whose per-env state is an explicit
  carry (``init_carry`` / ``step(obs, carry, is_first)``), saved and loaded alone
  (:func:`latentrl.load_policy`) without the agent, its optimizers or an env.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import read_key

__all__ = [
    "Agent",
    "check_obs_shape",
    "GoalObservation",
    "Policy",
    "RewardSamples",
    "SampleSpec",
    "Task",
    "UniformRandomPolicy",
    "UnsupportedTaskError",
    "config_from_preset",
    "resolve_device",
    "sample_batches",
    "scalar_metrics",
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
    offset: int | None = None
    """Fixed-offset pairs ``(o_t, o_{t+k}, a_{t:t+k})`` with ``k = offset`` (StaMo's probes); ``None``: off."""

    def sample_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``ReplayBuffer.sample`` (unset optional requests left out)."""
        out = dataclasses.asdict(self)
        if out["offset"] is None:
            del out["offset"]
        return out


def sample_batches(buffer, spec: SampleSpec | dict[str, SampleSpec]):
    """Serve an agent's :meth:`Agent.sample_spec`: one batch, or a TensorDict of named batches
    (``batch[name]``) when the update needs several requests."""
    if isinstance(spec, SampleSpec):
        return buffer.sample(**spec.sample_kwargs())
    if not isinstance(spec, dict) or not all(isinstance(s, SampleSpec) for s in spec.values()):
        raise TypeError(f"sample_spec() must return a SampleSpec or a dict of them, got {spec!r}")
    return TensorDict({name: buffer.sample(**s.sample_kwargs()) for name, s in spec.items()}, batch_size=[])


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


class Policy(nn.Module):
    """What acting needs, and nothing else: an ``nn.Module`` that is saved, loaded and exported alone.

    The contract (DESIGN.md, "agents — learner and policy, split"; DreamerV3's ``policy(carry, obs)``):

    - :meth:`init_carry` ``(N) -> carry``: the per-env state of ``N`` envs as a TensorDict ``[N]``
      (frame stack, skill / ``z``, belief, planner state), deterministic. An env's first step must
      pass ``is_first=True``: that row then restarts from :meth:`start_episode`, where per-episode
      random draws (a skill from the prior) happen, and only there.
    - :meth:`step` ``(obs, carry, is_first) -> (action, carry)``: a function of its inputs, with no
      hidden state. Rows with ``is_first`` (bool ``[N]``) restart from a fresh :meth:`init_carry`
      before acting, so an episode's first call must pass ``is_first=True`` for that row. With
      ``explore=False`` the action is deterministic given ``(obs, carry, is_first)`` and the random
      state used by :meth:`init_carry`. The input carry is never modified.
    - :meth:`reset` / ``policy(obs)``: a convenience that holds a carry, for evaluation loops and
      scripts: ``reset()`` restarts every env, ``reset(mask)`` the masked ones at their next call.

    Subclasses implement :meth:`act` on observations whose image key is already frame-stacked, and
    extend :meth:`init_carry` with their own entries. ``obs_key`` is the observation key the policy
    reads (``None``: none), ``obs_shape`` one env observation of it (a single frame ``[3, H, W]`` for
    pixels; ``frame_stack`` of them are stacked in the carry). Actions are ``[N, A]`` in [-1, 1] on
    the observation's device. ``step`` runs without gradients unless ``uses_autograd`` (PV-RNN's
    error regression optimises inside ``step``).
    """

    uses_autograd: bool = False
    sync_free: bool = False
    """Set by the trainer's GPU loop (``collector.inline_steps`` > 1): restarting rows never reads ``is_first``
    on the host. :meth:`start_episode` then draws rows for every env and keeps those of ``is_first``, which
    changes the random stream (not the distribution) of policies that draw at episode start (METRA's skills)."""

    def __init__(self, obs_key: str | None, obs_shape: tuple[int, ...], action_dim: int, *,
                 frame_stack: int = 1, explore: bool = False):
        super().__init__()
        self.obs_key = obs_key
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.action_dim = int(action_dim)
        self.frame_stack = int(frame_stack) if obs_key == "pixels" else 1
        self.explore = bool(explore)
        self._carry: TensorDict | None = None  # the convenience call's carry, never read by step()
        self._restart: Tensor | None = None

    @property
    def device(self) -> torch.device:
        # lazily: the first parameter (else buffer) decides, so nothing else is enumerated (this runs on
        # every policy step; unpacking every parameter and buffer first cost ~25% of a planner's step)
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    # ------------------------------------------------------------------------------ the contract
    def init_carry(self, batch_size: int) -> TensorDict:
        """A fresh carry ``[batch_size]`` on the policy's device; subclasses add their entries."""
        carry = TensorDict({}, batch_size=[int(batch_size)], device=self.device)
        if self.frame_stack > 1:
            carry["frames"] = torch.zeros(int(batch_size), self.frame_stack, *self.obs_shape, dtype=torch.uint8,
                                          device=self.device)
        return carry

    def start_episode(self, batch_size: int) -> TensorDict:
        """The carry rows of ``batch_size`` envs that start an episode (``is_first``): by default a fresh
        :meth:`init_carry`; policies that draw per-episode values (a skill from the prior) draw them here."""
        return self.init_carry(batch_size)

    def step(self, obs: TensorDict, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        """Actions ``[N, A]`` and the next carry from observations ``[N]`` (one newest frame)."""
        n = int(obs.batch_size[0]) if obs.batch_dims else 0
        if carry.batch_size[0] != n:
            raise ValueError(f"the carry holds {carry.batch_size[0]} envs but the observation {n}; "
                             f"make one with policy.init_carry({n})")
        is_first = torch.as_tensor(is_first, device=self.device).reshape(-1).bool()
        if is_first.numel() == 1 and n != 1:
            is_first = is_first.expand(n)
        if is_first.numel() != n:
            raise ValueError(f"is_first must be a bool [{n}], got {list(is_first.shape)}")
        out_device = self._out_device(obs)
        with torch.set_grad_enabled(self.uses_autograd and torch.is_grad_enabled()):
            carry = self._restart_rows(carry, is_first)
            x = self.read_obs(obs)
            if self.frame_stack > 1:
                x, carry = self._stack_frames(x, carry, is_first)
            action, carry = self.act(x, carry, is_first)
        return action.to(out_device), carry

    def act(self, x: Tensor | None, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        """Actions ``[N, A]`` from the (frame-stacked) input ``x`` of ``obs_key`` and the restarted carry."""
        raise NotImplementedError

    def extras(self, carry: TensorDict | None = None) -> dict[str, Tensor]:
        """Per-env tensors ``[N, ...]`` of a carry that are stored with each collected step (METRA's
        ``skill``); ``carry`` defaults to the convenience call's."""
        return {}

    # ---------------------------------------------------------------------------- convenience
    def reset(self, mask: Tensor | None = None) -> None:
        """Restart every env (``mask=None``) or the envs where ``mask`` ``[N]`` is true at their next call."""
        if mask is None or self._carry is None:
            self._carry, self._restart = None, None
            return
        mask = torch.as_tensor(mask, device=self.device).reshape(-1).bool()
        self._restart = mask if self._restart is None else self._restart | mask

    def forward(self, obs: TensorDict) -> Tensor:
        """``policy(obs)``: :meth:`step` with a carry the policy holds (see :meth:`reset`)."""
        n = int(obs.batch_size[0])
        if self._carry is None or self._carry.batch_size[0] != n:
            self._carry = self.init_carry(n)
            is_first = torch.ones(n, dtype=torch.bool, device=self.device)
        elif self._restart is not None:
            is_first = self._restart
        else:
            is_first = torch.zeros(n, dtype=torch.bool, device=self.device)
        action, self._carry = self.step(obs, self._carry, is_first)
        self._restart = None
        return action

    @property
    def carry(self) -> TensorDict | None:
        """The carry of the convenience call (``None`` before the first call or after :meth:`reset`)."""
        return self._carry

    # ----------------------------------------------------------------------------------- pieces
    def read_obs(self, obs: TensorDict) -> Tensor | None:
        """``obs[obs_key]`` on the policy's device (``None`` for a policy that reads nothing)."""
        if self.obs_key is None:
            return None
        return read_key(obs, self.obs_key, type(self).__name__).to(self.device)

    def _out_device(self, obs: TensorDict) -> torch.device:
        if self.obs_key is not None and self.obs_key in obs.keys():
            return obs[self.obs_key].device
        return obs.device if obs.device is not None else torch.device("cpu")

    def _restart_rows(self, carry: TensorDict, is_first: Tensor) -> TensorDict:
        if self.sync_free:  # no host read of is_first: fresh rows for every env, kept where is_first
            return self.start_episode(carry.batch_size[0]).where(is_first, carry)
        if not bool(is_first.any()):
            return carry
        fresh = self.start_episode(int(is_first.sum()))
        carry = carry.clone()
        carry[is_first] = fresh
        return carry

    def _stack_frames(self, frame: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        """``frame`` ``[N, C, H, W]`` -> stacked ``[N, k*C, H, W]`` (oldest first); a restarted row is
        filled with its first frame, the clamping ``ReplayBuffer.sample`` does at episode starts."""
        frames = torch.cat([carry["frames"][:, 1:], frame.unsqueeze(1)], dim=1)
        tiled = frame.unsqueeze(1).expand(-1, self.frame_stack, *frame.shape[1:])
        frames = torch.where(is_first.reshape(-1, 1, 1, 1, 1), tiled, frames)
        carry = carry.clone(False)
        carry["frames"] = frames
        return frames.flatten(1, 2), carry


class UniformRandomPolicy(Policy):
    """Uniform random actions in [-1, 1]: the baseline for coverage, goal reaching and zero-shot returns."""

    def __init__(self, action_dim: int, generator: torch.Generator | None = None):
        super().__init__(None, (), action_dim, explore=True)
        self.generator = generator

    def act(self, x: Tensor | None, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        return torch.rand(carry.batch_size[0], self.action_dim, generator=self.generator) * 2.0 - 1.0, carry


class Agent(nn.Module):
    """Base class of every agent; see DESIGN.md for the contract.

    Subclasses set ``world_model`` and implement :meth:`sample_spec`, :meth:`update`,
    :meth:`policy` and, where they support zero-shot tasks, :meth:`infer_task`.
    """

    world_model: WorldModel
    name: str = "agent"
    inference_modules: tuple[str, ...] = ("world_model", "actor")
    """Submodules a model directory keeps: what :meth:`policy` and :meth:`infer_task` read."""
    inference_exclude: tuple[str, ...] = ("world_model.targets.",)
    """State-dict prefixes left out of a model directory even under ``inference_modules`` (EMA targets)."""

    @property
    def env_steps(self) -> int:
        """Env steps collected so far (all envs together); the trainer keeps it current."""
        return int(self.env_steps_counter)

    @env_steps.setter
    def env_steps(self, value: int) -> None:
        self.env_steps_counter.fill_(int(value))

    @property
    def env_steps_counter(self) -> Tensor:
        """``env_steps`` as a 0-dim CPU tensor shared with the agent's policies (RND's exploration
        schedule follows it) without the policies holding the agent. Not part of ``state_dict``."""
        counter = self.__dict__.get("_env_steps_counter")
        if counter is None:
            counter = self.__dict__["_env_steps_counter"] = torch.zeros((), dtype=torch.int64)
        return counter

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

    def sample_spec(self) -> SampleSpec | dict[str, SampleSpec]:
        """What :meth:`update` needs from the buffer: one request, or named requests served together
        (``update`` then gets a TensorDict holding one batch per name)."""
        raise NotImplementedError

    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        """One gradient update from a replay batch; returns its metrics for logging as detached 0-dim float32
        tensors on the agent's device (:func:`scalar_metrics`), never Python floats: reading a value forces the
        host to wait for the device, so the trainer reads all of them once per log row, not once per update.
        ``float(v)`` reads one."""
        raise NotImplementedError

    def policy(self, task: Task | None = None, *, explore: bool = False) -> Policy:
        raise NotImplementedError

    def infer_task(self, spec: RewardSamples | GoalObservation) -> Task:
        raise UnsupportedTaskError(
            f"agent {self.name!r} does not infer zero-shot tasks ({type(spec).__name__} given); "
            "use an agent that does (td_jepa, fb, metra for goals)"
        )

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers, saved and restored with checkpoints."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter training state (running statistics, counters) for checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        del state


def scalar_metrics(metrics: dict[str, Tensor | float], device: torch.device | str) -> dict[str, Tensor]:
    """What :meth:`Agent.update` returns: each value as a detached 0-dim float32 tensor on ``device``.

    The values are copied into one new tensor (one ``stack``, no host sync), so later in-place changes of
    what they were read from (a running statistic's buffer) do not change the metrics already returned.
    """
    if not metrics:
        return {}
    values = [torch.as_tensor(v).detach().reshape(()).to(device=device, dtype=torch.float32) for v in metrics.values()]
    return dict(zip(metrics, torch.stack(values).unbind(), strict=True))


def check_obs_shape(obs_type: str, obs_shape) -> tuple[int, ...]:
    """``obs_shape`` as a tuple of ints, checked against ``obs_type``: pixels need one frame ``[3, H, W]``,
    every other observation type a vector ``[P]``."""
    shape = tuple(int(s) for s in obs_shape)
    if obs_type == "pixels" and len(shape) != 3:
        raise ValueError(f"obs_type='pixels' needs a frame shape [3, H, W], got {list(shape)}")
    if obs_type != "pixels" and len(shape) != 1:
        raise ValueError(f"obs_type={obs_type!r} needs a vector shape [P], got {list(shape)}")
    return shape


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def config_from_preset(config_cls: type, presets: dict[str, dict[str, Any]], preset: str, overrides: dict[str, Any]):
    """Build an agent config dataclass from a named preset plus overrides, refusing unknown names."""
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
