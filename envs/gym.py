"""Gymnasium registration: ``gymnasium.make("latentrl/walker-walk-v0", obs_type="pixels")``.

Ids are registered when :mod:`latentrl.envs` is imported (or use the id
``"latentrl.envs:latentrl/walker-walk-v0"``, which imports it for you). One env in this process,
with the same fast renderer, reward and episode length as ``make_env``; ``pixels`` are HWC uint8
as gymnasium's image spaces expect.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from latentrl.envs.backend import check_action, check_env_args, check_int, closed_env_error
from latentrl.envs.dmc import EnvConfig, _Slots
from latentrl.envs.tasks import get_physics_state, list_tasks

__all__ = ["LatentrlGymEnv", "register_envs", "OBS_TYPES"]

OBS_TYPES = ("pixels", "state", "pixels_state")


class LatentrlGymEnv(gym.Env):
    """One dm_control task as a gymnasium env.

    ``obs_type``: ``"pixels"`` (Box uint8 [H, W, 3]), ``"state"`` (Box float32 [D]) or
    ``"pixels_state"`` (Dict of both). ``info["physics"]`` holds the full physics state.
    Arguments are checked as ``make_env`` checks them; ``step`` refuses actions of the wrong shape and
    non-finite actions and clips the others to [-1, 1].
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 40}

    def __init__(self, task: str, obs_type: str = "pixels", image_size: int = 64, action_repeat: int = 1,
                 floor: str = "default", camera: int | None = None, episode_length: int | None = None,
                 render_mode: str | None = "rgb_array"):
        if obs_type not in OBS_TYPES:
            raise ValueError(f"unknown obs_type {obs_type!r}; obs_type must be one of {OBS_TYPES}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"unknown render_mode {render_mode!r}; this env renders {self.metadata['render_modes']} "
                             "(or None)")
        check_env_args(("pixels",), floor, action_repeat, 1, image_size, episode_length)
        self._closed = True  # until built
        self.obs_type, self.render_mode = obs_type, render_mode
        keys = ("pixels", "state", "physics")
        cfg = EnvConfig(task, keys, image_size, camera, action_repeat, floor, episode_length or 1000, 1)
        self._arrays: dict[str, np.ndarray] = {}
        self._slots = _Slots(cfg, [0], [0], self._arrays)
        probe = self._slots.envs[0]
        self._closed = False
        if camera is not None:
            try:
                check_int("camera", camera, low=-1, high=probe.physics.model.ncam - 1,
                          fix="a camera id of the task's model (-1: the free camera), or None for the domain's default")
            except ValueError:
                self.close()
                raise
        if episode_length is None:
            limit = probe._step_limit
            episode_length = max(1, int(limit) // action_repeat) if np.isfinite(limit) else 1000
            cfg = EnvConfig(task, keys, image_size, camera, action_repeat, floor, episode_length, 1)
            self._slots.cfg = cfg
        time_step = probe.reset()
        state_dim = sum(int(np.prod(np.shape(v))) for v in time_step.observation.values())
        physics_dim = len(get_physics_state(probe.physics))
        action_dim = probe.action_spec().shape[0]
        self._arrays.update({
            "pixels": np.zeros((1, 3, image_size, image_size), np.uint8),
            "state": np.zeros((1, state_dim), np.float32),
            "physics": np.zeros((1, physics_dim), np.float64),
            "action": np.zeros((1, action_dim), np.float32),
            "reward": np.zeros(1), "terminated": np.zeros(1, bool), "truncated": np.zeros(1, bool),
            "episode": np.zeros(1, np.int64), "step": np.zeros(1, np.int64),
        })
        pix = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        state = spaces.Box(-np.inf, np.inf, (state_dim,), np.float32)
        self.observation_space = {"pixels": pix, "state": state,
                                  "pixels_state": spaces.Dict({"pixels": pix, "state": state})}[obs_type]
        self.action_space = spaces.Box(-1.0, 1.0, (action_dim,), np.float32)

    def _obs(self) -> Any:
        pixels = self._arrays["pixels"][0].transpose(1, 2, 0).copy()
        state = self._arrays["state"][0].copy()
        return {"pixels": pixels, "state": state, "pixels_state": {"pixels": pixels, "state": state}}[self.obs_type]

    def _info(self) -> dict:
        return {"physics": self._arrays["physics"][0].copy(), "step": int(self._arrays["step"][0])}

    def _check_open(self) -> None:
        if self._closed:
            task = self._slots.cfg.task
            raise closed_env_error(task, f"gymnasium.make('latentrl/{task}-v0', ...)")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._check_open()
        super().reset(seed=seed)
        if seed is not None:
            self._slots.seed([seed])
        self._slots.reset()
        return self._obs(), self._info()

    def step(self, action):
        self._check_open()
        self._arrays["action"][0] = check_action(np.asarray(action, dtype=np.float32), self.action_space.shape,
                                              "env.action_space.shape").numpy()
        self._slots.step()
        a = self._arrays
        return self._obs(), float(a["reward"][0]), bool(a["terminated"][0]), bool(a["truncated"][0]), self._info()

    def render(self):
        return self._arrays["pixels"][0].transpose(1, 2, 0).copy()

    def close(self):
        if not getattr(self, "_closed", True):
            self._closed = True
            self._slots.close()


def register_envs() -> None:
    """Register ``latentrl/<task>-v0`` for every task (idempotent)."""
    for task in list_tasks():
        env_id = f"latentrl/{task}-v0"
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point="latentrl.envs.gym:LatentrlGymEnv", kwargs={"task": task},
                         disable_env_checker=False)
