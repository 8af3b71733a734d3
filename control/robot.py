"""The robot protocol, in LeRobot's vocabulary (``robots/robot.py``), and its errors.

A robot driver written for LeRobot's conventions (``connect`` / ``get_observation`` / ``send_action``
/ ``disconnect``, ``observation_features`` / ``action_features``) fits through a thin adapter that
maps its raw keys (``"<motor>.pos"``, camera ``HxWx3`` arrays) onto latentrl's keys:

- ``pixels`` uint8 ``[3, H, W]``, ``state`` float32 ``[D]``, ``physics`` float64 ``[P]`` (simulation
  only, recorded, never fed to a policy), ``reward`` float32 ``[]`` (simulation; NaN on hardware),
  ``timestamp`` float64 ``[]`` (``time.monotonic()`` at capture), ``seq`` int64 ``[]`` (capture counter);
- ``action`` float32 ``[A]`` in [-1, 1], mapped by the robot to its own units.

``get_observation`` is non-blocking and returns the newest sample (LeRobot's ``read_latest``): the
control loop judges staleness from ``seq`` and ``timestamp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from tensordict import TensorDict
from torch import Tensor

__all__ = [
    "DeviceAlreadyConnectedError",
    "DeviceNotConnectedError",
    "Feature",
    "LeRobotAdapter",
    "Robot",
    "RobotFaultError",
]


class DeviceNotConnectedError(ConnectionError):
    """The robot is not connected (``connect()`` it first), or its connection was lost."""


class DeviceAlreadyConnectedError(ConnectionError):
    """``connect()`` on a robot that is already connected."""


class RobotFaultError(RuntimeError):
    """The robot stopped itself (watchdog, limits); it applies a safe command until reconnected."""


@dataclass(frozen=True)
class Feature:
    """One observation or action entry: shape, dtype, the names of its elements, and its limits."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    names: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    description: str = field(default="", compare=False)

    def check(self, value, key: str) -> str | None:
        """Why ``value`` does not fit this feature (wrong type, shape, dtype, non-finite), or ``None``."""
        if not isinstance(value, Tensor):
            return f"{key} is a {type(value).__name__}, not a tensor"
        if tuple(value.shape) != tuple(self.shape):
            return f"{key} has shape {list(value.shape)}, expected {list(self.shape)}"
        if value.dtype != self.dtype:
            return f"{key} has dtype {value.dtype}, expected {self.dtype}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key} holds NaN or inf"
        return None


@runtime_checkable
class Robot(Protocol):
    """What the control loop drives (after LeRobot's ``Robot``).

    ``observation_features`` and ``action_features`` are valid before ``connect``. Errors:
    :class:`DeviceNotConnectedError` / :class:`DeviceAlreadyConnectedError` (``ConnectionError``s),
    ``ValueError`` for an action of the wrong shape or with non-finite values (never applied),
    ``TimeoutError`` when ``connect`` gets no first observation, :class:`RobotFaultError` after a
    robot-side stop. ``preferred_fallback`` is ``"zero"`` (torque / velocity actuators) or ``"hold"``
    (position targets): what the loop sends when it has no good action.
    """

    name: str
    observation_features: dict[str, Feature]
    action_features: dict[str, Feature]
    preferred_fallback: str

    @property
    def is_connected(self) -> bool: ...

    @property
    def is_calibrated(self) -> bool: ...

    def connect(self, calibrate: bool = True) -> None: ...

    def calibrate(self) -> None: ...

    def configure(self) -> None: ...

    def get_observation(self) -> TensorDict: ...

    def send_action(self, action: Tensor) -> Tensor: ...

    def disconnect(self) -> None: ...


def action_dim(robot: Robot) -> int:
    """Length ``A`` of the robot's ``action`` feature."""
    return int(robot.action_features["action"].shape[0])


def check_action(action: Tensor, dim: int) -> Tensor:
    """``action`` as float32 ``[dim]``; ``ValueError`` for a wrong shape or non-finite values (never applied)."""
    action = torch.as_tensor(action, dtype=torch.float32).reshape(-1)
    if action.shape[0] != dim:
        raise ValueError(f"an action has {dim} values, got shape {list(action.shape)}")
    if not bool(torch.isfinite(action).all()):
        raise ValueError(f"refusing a non-finite action {action.tolist()}")
    return action


class LeRobotAdapter:
    """A robot written for LeRobot's conventions behind latentrl's :class:`Robot` protocol (a thin adapter).

    LeRobot's ``get_observation()`` returns raw keys: ``"<motor>.pos"`` floats and camera frames
    ``HxWx3`` uint8 arrays; ``send_action`` takes and returns ``{"<motor>.pos": value}``. This adapter
    stacks the motors' positions into ``state`` ``[M]`` (in ``motors`` order), turns the camera frame
    into ``pixels`` ``[3, H, W]``, stamps ``timestamp`` (``time.monotonic()`` at read) and ``seq`` (a read
    counter: LeRobot has none, so staleness is judged by age), and maps actions in [-1, 1] linearly onto
    each motor's ``[low, high]`` (and what the robot applied back). Position targets: the fallback is
    ``"hold"``.
    """

    preferred_fallback = "hold"

    def __init__(self, robot, motors: list[str], limits: dict[str, tuple[float, float]], camera: str | None = None):
        self.robot, self.motors, self.camera = robot, list(motors), camera
        self.name = f"lerobot:{getattr(robot, 'name', type(robot).__name__)}"
        missing = [m for m in self.motors if m not in limits]
        if missing:
            raise ValueError(f"limits must give (low, high) for every motor; missing {missing}")
        self.low = torch.tensor([float(limits[m][0]) for m in self.motors])
        self.high = torch.tensor([float(limits[m][1]) for m in self.motors])
        if not bool((self.high > self.low).all()):
            raise ValueError("every motor needs low < high in limits")
        self._seq = 0
        names = tuple(f"{m}.pos" for m in self.motors)
        self.observation_features: dict[str, Feature] = {
            "state": Feature((len(self.motors),), torch.float32, names),
            "timestamp": Feature((), torch.float64), "seq": Feature((), torch.int64),
        }
        if camera is not None:
            h, w, c = tuple(robot.observation_features[camera])
            self.observation_features["pixels"] = Feature((c, h, w), torch.uint8, low=0, high=255)
        self.action_features = {"action": Feature((len(self.motors),), torch.float32, names, -1.0, 1.0)}

    @property
    def is_connected(self) -> bool:
        return bool(self.robot.is_connected)

    @property
    def is_calibrated(self) -> bool:
        return bool(getattr(self.robot, "is_calibrated", True))

    def connect(self, calibrate: bool = True) -> None:
        self.robot.connect(calibrate)

    def calibrate(self) -> None:
        self.robot.calibrate()

    def configure(self) -> None:
        self.robot.configure()

    def get_observation(self) -> TensorDict:
        import time

        import numpy as np

        raw = self.robot.get_observation()
        stamp = time.monotonic()
        out = {"state": torch.tensor([float(raw[f"{m}.pos"]) for m in self.motors], dtype=torch.float32),
               "timestamp": torch.tensor(stamp, dtype=torch.float64), "seq": torch.tensor(self._seq)}
        self._seq += 1
        if self.camera is not None:
            frame = torch.from_numpy(np.ascontiguousarray(raw[self.camera]))
            out["pixels"] = frame.permute(2, 0, 1).contiguous()
        return TensorDict(out, batch_size=[])

    def send_action(self, action: Tensor) -> Tensor:
        action = check_action(action, len(self.motors)).clamp(-1.0, 1.0)
        target = self.low + (action + 1.0) * 0.5 * (self.high - self.low)
        applied = self.robot.send_action({f"{m}.pos": float(v) for m, v in zip(self.motors, target, strict=True)})
        back = torch.tensor([float(applied[f"{m}.pos"]) for m in self.motors])
        return ((back - self.low) / (self.high - self.low) * 2.0 - 1.0).float()

    def disconnect(self) -> None:
        self.robot.disconnect()
