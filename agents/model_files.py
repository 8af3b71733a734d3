"""Model directories: what a trained agent needs to act and infer tasks, without the training stack.

A model directory (DESIGN.md, "models on disk") holds two files:

- ``config.json``: the agent's name, its config dataclass as written, observation key and shape,
  action size, the task the policy is fixed to (if any; with its goal observation's keys and batch dims),
  and the run's env settings (``env``), so that evaluation can rebuild the same env;
- ``model.safetensors``: the agent's *inference* weights: the policy's modules plus what
  ``infer_task`` reads (TD-JEPA's ``psi``, FB's ``B``, METRA's ``phi``), without optimiser states,
  target networks, critics or the replay buffer. A fixed task's tensors are stored as ``task.z`` and its goal
  observation (``Task.goal``, when it has one) as ``task.goal.<key>``.

safetensors holds tensors only, and JSON holds data only, so opening a model directory never runs
code. :func:`load_policy` and :func:`load_agent_for_inference` rebuild from these two files without
an env (this module does not import ``latentrl.envs``), an optimiser step or a buffer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor

from latentrl.agents.base import Agent, Policy, Task
from latentrl.agents.registry import agent_class

__all__ = ["MODEL_FORMAT", "load_agent_for_inference", "load_policy", "read_model_config", "save_model"]

MODEL_FORMAT = "latentrl.model/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def _json_safe(value: Any) -> Any:
    """``value`` if JSON can hold it (numbers, strings, bools, None, lists and dicts of them), else ``None``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return None


def inference_state_dict(agent: Agent) -> dict[str, Tensor]:
    """The tensors of ``agent.state_dict()`` under its ``inference_modules``, minus ``inference_exclude``."""
    keep = tuple(f"{m}." for m in agent.inference_modules)
    drop = tuple(agent.inference_exclude)
    return {k: v for k, v in agent.state_dict().items() if k.startswith(keep) and not k.startswith(drop)}


def save_model(path: str | Path, agent: Agent, *, task: Task | None = None, env: dict | None = None,
               extra: dict | None = None) -> Path:
    """Write a model directory for ``agent`` (and, with ``task``, a policy fixed to that task) atomically.

    ``env`` (the run's env settings: task, obs, image_size, action_repeat, floor, ...) and ``extra``
    (e.g. the training step and dataset) go into ``config.json`` for evaluation tools. An existing
    directory at ``path`` is replaced only once the new one is complete.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if agent.config_class is None or not dataclasses.is_dataclass(agent.config):
        raise TypeError(f"{type(agent).__name__} has no config dataclass (config_class); it cannot be saved as a "
                        "model directory")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in inference_state_dict(agent).items()}
    task_json = None
    if task is not None:
        if task.z is not None:
            tensors["task.z"] = torch.as_tensor(task.z).detach().to("cpu", torch.float32).contiguous().clone()
        goal_keys = []
        if task.goal is not None:  # the goal observation a policy keeps comparing against (Task.goal)
            for key, value in task.goal.items(include_nested=True, leaves_only=True):
                name = ".".join(key) if isinstance(key, tuple) else key
                tensors[f"task.goal.{name}"] = value.detach().to("cpu").contiguous().clone()
                goal_keys.append(name)
        task_json = {"info": _json_safe({k: v for k, v in task.info.items() if _json_safe(v) is not None}),
                     "has_z": task.z is not None, "goal_keys": goal_keys,
                     "goal_batch_dims": task.goal.batch_dims if task.goal is not None else 0}
    config = {
        "format": MODEL_FORMAT,
        "agent": agent.name,
        "config": _json_safe(dataclasses.asdict(agent.config)),
        "obs_shape": list(agent.obs_shape),
        "action_dim": int(agent.action_dim),
        "task": task_json,
        "env": _json_safe(env or {}),
        **_json_safe(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_model_config(path: str | Path) -> dict:
    """``config.json`` of a model directory, checked: a clear error for a missing or foreign folder."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir() or not file.exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path} is not a model directory (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                "train_agent.py writes one as <run>/model, next to the checkpoints")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the model directory is damaged") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{file} has format {found!r}, expected {MODEL_FORMAT!r}")
    return config


def load_agent_for_inference(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[Agent, dict]:
    """Rebuild the agent of a model directory in eval mode with its inference weights (for ``infer_task``
    and ``policy``); critics, targets and optimiser states keep their initial values. Returns
    ``(agent, config)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from latentrl.agents.base import resolve_device

    config = read_model_config(path)
    cls = agent_class(config["agent"])
    agent_config = cls.config_class(**config["config"])
    agent = cls(agent_config, tuple(config["obs_shape"]), int(config["action_dim"]), device=resolve_device(device))
    try:
        tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{Path(path) / WEIGHTS_FILE} cannot be read ({err}); the model directory is "
                         "damaged") from None
    expected = inference_state_dict(agent)
    weights = {k: v for k, v in tensors.items() if not k.startswith("task.")}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit a {config['agent']} agent with this config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {list(value.shape)}, the config builds "
                             f"{list(expected[key].shape)}")
    agent.load_state_dict(weights, strict=False)
    agent.eval()
    config["_task_tensors"] = {k[len("task."):]: v for k, v in tensors.items() if k.startswith("task.")}
    return agent, config


def load_policy(path: str | Path, *, device: str | torch.device = "cpu", explore: bool = False) -> Policy:
    """The Policy of a model directory (its fixed task, if it was saved with one), in eval mode.

    Needs no env, optimiser or replay buffer, and never imports ``latentrl.envs``. The agent it is
    rebuilt from is dropped: the policy holds only its own modules.
    """
    agent, config = load_agent_for_inference(path, device=device)
    task = None
    if config.get("task") is not None:
        tensors = config["_task_tensors"]
        z = tensors.get("z")
        goal = None
        if config["task"].get("goal_keys"):
            keys = config["task"]["goal_keys"]
            goal = TensorDict({tuple(k.split(".")): tensors[f"goal.{k}"].to(agent.device) for k in keys},
                              batch_size=tensors[f"goal.{keys[0]}"].shape[:config["task"].get("goal_batch_dims", 0)])
        task = Task(z=None if z is None else z.to(agent.device), goal=goal,
                    info=dict(config["task"].get("info") or {}))
    policy = agent.policy(task, explore=explore)
    policy.eval()
    return policy
