"""A fake robot and a fake clock: the control loop's logic, deterministic and without a simulator."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict
from torch import Tensor

from latentrl.control.robot import (
    DeviceAlreadyConnectedError,
    DeviceNotConnectedError,
    Feature,
    check_action,
)

__all__ = ["DEMO_CASES", "FakeClock", "FakeRobot", "save_demo_model"]


class FakeClock:
    """Virtual time: ``sleep_until`` jumps to the time asked, ``advance`` moves it (a slow policy)."""

    def __init__(self, start: float = 1000.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, float(t))

    def advance(self, dt: float) -> None:
        self.t += float(dt)


class FakeRobot:
    """A robot with a ``state`` ``[state_dim]`` that moves by the applied action, and hooks to inject faults.

    ``obs_hook(i, obs)`` may return a changed observation (NaN, a wrong shape, an old ``seq``) or raise
    (a disconnect) for the ``i``-th ``get_observation`` call. Every applied action is kept in ``sent``
    with its time in ``sent_t``. ``disconnect_after=n``: from the ``n``-th observation on, every call
    raises :class:`DeviceNotConnectedError` (a cable pulled).
    """

    name = "fake"
    preferred_fallback = "zero"

    def __init__(self, state_dim: int = 4, action_dim: int = 2, *, clock=None,
                 obs_hook: Callable[[int, TensorDict], TensorDict] | None = None, disconnect_after: int | None = None,
                 image_size: int = 0):
        import time

        self.clock = clock
        self._now = clock.now if clock is not None else time.monotonic
        self.state_dim, self.action_dim, self.image_size = state_dim, action_dim, image_size
        self.observation_features = {
            "state": Feature((state_dim,), torch.float32),
            "reward": Feature((), torch.float32),
            "timestamp": Feature((), torch.float64),
            "seq": Feature((), torch.int64),
        }
        if image_size:
            self.observation_features["pixels"] = Feature((3, image_size, image_size), torch.uint8, low=0, high=255)
        self.action_features = {"action": Feature((action_dim,), torch.float32, None, -1.0, 1.0)}
        self.obs_hook, self.disconnect_after = obs_hook, disconnect_after
        self._connected = False
        self.calls = 0
        self.state = torch.zeros(state_dim)
        self.sent: list[Tensor] = []
        self.sent_t: list[float] = []
        self.connects = self.disconnects = 0

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def connect(self, calibrate: bool = True) -> None:
        if self._connected:
            raise DeviceAlreadyConnectedError("fake robot already connected")
        self._connected = True
        self.connects += 1

    def _lost(self) -> bool:
        return self.disconnect_after is not None and self.calls >= self.disconnect_after

    def get_observation(self) -> TensorDict:
        if not self._connected:
            raise DeviceNotConnectedError("fake robot is not connected")
        i = self.calls
        self.calls += 1
        if self._lost():
            raise DeviceNotConnectedError("fake robot: connection lost")
        obs = TensorDict({
            "state": self.state.clone(),
            "reward": torch.tensor(float(-self.state.abs().sum())),
            "timestamp": torch.tensor(self._now(), dtype=torch.float64),
            "seq": torch.tensor(i, dtype=torch.int64),
        }, batch_size=[])
        if self.image_size:
            obs["pixels"] = torch.full((3, self.image_size, self.image_size), i % 256, dtype=torch.uint8)
        if self.obs_hook is not None:
            obs = self.obs_hook(i, obs)
        return obs

    def send_action(self, action: Tensor) -> Tensor:
        if not self._connected or self._lost():
            raise DeviceNotConnectedError("fake robot is not connected")
        action = check_action(action, self.action_dim).clamp(-1.0, 1.0)
        self.sent.append(action.clone())
        self.sent_t.append(self._now())
        self.state[: self.action_dim] += 0.1 * action[: self.state_dim]
        return action

    def disconnect(self) -> None:
        if self._connected:
            self.disconnects += 1
        self._connected = False


DEMO_CASES = ("rnd", "metra_skill", "metra_goal", "td_jepa_reward", "fb_reward", "active_inference")


def save_demo_model(case: str, root, preset: str = "smoke", action_dim: int = 2):
    """An untrained pixel agent of ``case`` (``DEMO_CASES``: the agent and its task kind) saved as a model
    directory ``<root>/<case>/model`` for reacher-easy, with its task (a random skill, goal frame or reward
    samples): the policies of every agent, for tests and benchmarks. ``preset`` falls back to ``small``
    where an agent has no preset of that name."""
    from pathlib import Path

    from latentrl.agents import agent_class
    from latentrl.agents.base import GoalObservation, RewardSamples
    from latentrl.agents.model_files import save_model

    if case not in DEMO_CASES:
        raise ValueError(f"unknown demo case {case!r}; valid: {', '.join(DEMO_CASES)}")
    names = {"metra_skill": "metra", "metra_goal": "metra", "td_jepa_reward": "td_jepa", "fb_reward": "fb"}
    name = names.get(case, case)
    cls = agent_class(name)
    torch.manual_seed(0)
    preset = preset if preset in cls.presets else "small"
    agent = cls(cls.make_config(preset, obs_type="pixels"), (3, 64, 64), action_dim).eval()
    g = torch.Generator().manual_seed(1)
    stack = getattr(agent.config, "frame_stack", 1)
    task = None
    if case == "metra_skill":
        task = agent.skill_task(torch.randn(agent.config.dim_option, generator=g))
    elif case == "metra_goal":
        goal = TensorDict(pixels=torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=g), batch_size=[1])
        task = agent.infer_task(GoalObservation(goal))
    elif case.endswith("_reward"):
        obs = TensorDict(pixels=torch.randint(0, 256, (32, 3 * stack, 64, 64), dtype=torch.uint8, generator=g),
                         batch_size=[32])
        task = agent.infer_task(RewardSamples(obs, torch.rand(32, 1, generator=g)))
    env = {"task": "reacher-easy", "obs": ["pixels", "state", "physics"], "image_size": 64, "action_repeat": 1}
    return save_model(Path(root) / case / "model", agent, task=task, env=env, extra={"preset": preset})
