"""Robots, the real-time control loop, its safety layer and telemetry, recording, and policy export.

- :mod:`latentrl.control.robot`      the ``Robot`` protocol (LeRobot's vocabulary) and its errors
- :mod:`latentrl.control.sim`        ``SimRobot``: a dm_control task in real time in its own process
- :mod:`latentrl.control.loop`       ``ControlLoop``, ``SafetyConfig``: deadlines, fallbacks, e-stop
- :mod:`latentrl.control.telemetry`  per-tick latencies and faults, CSV / JSON / TensorBoard
- :mod:`latentrl.control.recorder`   every step as a replay dataset (``train_agent.py data=``)
- :mod:`latentrl.control.export`     ONNX / ``torch.export`` with the carry as explicit inputs and outputs
- :mod:`latentrl.control.fake`       ``FakeRobot`` and ``FakeClock`` for tests without a simulator

Submodules are imported on first use, so ``import latentrl.control`` stays light.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "robot": ["Robot", "Feature", "LeRobotAdapter", "DeviceNotConnectedError", "DeviceAlreadyConnectedError",
              "RobotFaultError"],
    "sim": ["SimRobot", "LatencyModel"],
    "loop": ["ControlLoop", "SafetyConfig", "SafetyLayer", "MonotonicClock"],
    "telemetry": ["Fault", "Telemetry"],
    "recorder": ["Recorder"],
    "export": ["export_policy", "load_exported", "OnnxPolicy", "TorchExportPolicy", "PolicyNotExportableError"],
    "fake": ["FakeRobot", "FakeClock"],
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"latentrl.control.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'latentrl.control' has no attribute {name!r}")
