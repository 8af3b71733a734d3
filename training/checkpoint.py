"""Atomic training checkpoints: agent, optimizers, counters, RNG streams and the replay buffer.

A checkpoint is written to a temporary file in the same folder and moved over the old one with
``os.replace``, so a run killed at any moment leaves either the previous or the new checkpoint,
never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrl.agents.base import Agent

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng", "load_agent"]


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, agent: Agent, *, counters: dict[str, int], config: dict,
                    buffer_state: dict | None = None, keep_as: str | None = None) -> Path:
    """Write everything needed to continue training to ``path`` atomically.

    ``keep_as`` also keeps this checkpoint under that file name beside ``path`` (a hard link where the
    file system allows, else a copy), so that later checkpoints do not replace it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": 1,
        "agent_name": agent.name,
        "agent": agent.state_dict(),
        "optimizers": {k: opt.state_dict() for k, opt in agent.optimizers().items()},
        "agent_extra": agent.extra_state(),
        "counters": dict(counters),
        "rng": capture_rng(),
        "config": config,
        "buffer": buffer_state,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    if keep_as is not None:
        kept = path.with_name(keep_as)
        kept.unlink(missing_ok=True)
        try:
            os.link(path, kept)
        except OSError:
            shutil.copy2(path, kept)
    return path


def load_checkpoint(path: str | Path, agent: Agent | None = None, *, restore_rng_state: bool = True) -> dict:
    """Load a checkpoint; with ``agent`` given, restore its parameters, optimizers and extra state."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if agent is not None:
        restore_agent(payload, agent, path)
    if restore_rng_state:
        restore_rng(payload["rng"])
    return payload


def restore_agent(payload: dict, agent: Agent, path: str | Path = "the checkpoint") -> None:
    """Put a loaded checkpoint's parameters, optimizer states and extra state into ``agent``."""
    if payload["agent_name"] != agent.name:
        raise ValueError(f"checkpoint {path} holds agent {payload['agent_name']!r}, not {agent.name!r}")
    agent.load_state_dict(payload["agent"])
    optimizers = agent.optimizers()
    for name, state in payload["optimizers"].items():
        optimizers[name].load_state_dict(state)
    agent.load_extra_state(payload["agent_extra"])


def load_agent(path: str | Path, *, device: str = "cpu") -> tuple[Agent, dict]:
    """Rebuild the agent of a training checkpoint (with its env specs) for evaluation.

    Returns the agent in eval mode and the run config stored with it.
    """
    from latentrl.agents import make_agent
    from latentrl.envs import make_env

    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    cfg = payload["config"]
    env_cfg = dict(cfg["env"])
    env = make_env(env_cfg["task"], obs=tuple(env_cfg["obs"]), image_size=env_cfg["image_size"],
                   action_repeat=env_cfg["action_repeat"], num_envs=1, seed=0, floor=env_cfg["floor"],
                   num_workers=0)
    try:
        agent = make_agent(cfg["agent"]["name"], env, preset=cfg["agent"]["preset"], device=device,
                           **cfg["agent"].get("overrides", {}))
    finally:
        env.close()
    agent.load_state_dict(payload["agent"])
    agent.load_extra_state(payload["agent_extra"])
    agent.eval()
    return agent, cfg
