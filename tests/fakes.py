"""Shared test doubles for agent tests: env specs and replay batches without an env or a buffer."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Composite, Unbounded

STATE_DIM, ACTION_DIM, IMAGE = 24, 6, 64


class SpecEnv:
    """Just the specs of a ``make_env`` env with one env: what ``from_env`` reads."""

    def __init__(self, keys=("pixels", "state"), state_dim: int = STATE_DIM, action_dim: int = ACTION_DIM):
        spec = Composite(shape=(1,))
        if "pixels" in keys:
            spec["pixels"] = Bounded(0, 255, shape=(1, 3, IMAGE, IMAGE), dtype=torch.uint8)
        if "state" in keys:
            spec["state"] = Unbounded(shape=(1, state_dim), dtype=torch.float32)
        self.observation_spec = spec
        self.action_spec = Bounded(-1.0, 1.0, shape=(1, action_dim), dtype=torch.float32)


def random_obs(obs_type: str, n: int, frames: int = 3, generator: torch.Generator | None = None) -> dict:
    """``pixels`` uint8 [n, 3*frames, 64, 64] (a stacked frame) or ``state`` float32 [n, 24]."""
    if obs_type == "pixels":
        return {"pixels": torch.randint(0, 256, (n, 3 * frames, IMAGE, IMAGE), dtype=torch.uint8, generator=generator)}
    return {"state": torch.randn(n, STATE_DIM, generator=generator)}


def replay_batch(obs_type: str, n: int, seed: int = 0) -> TensorDict:
    """A reward-free replay batch as ``ReplayBuffer.sample(n, frame_stack=3)`` returns it."""
    g = torch.Generator().manual_seed(seed)
    return TensorDict({
        **random_obs(obs_type, n, generator=g),
        "action": torch.rand(n, ACTION_DIM, generator=g) * 2 - 1,
        "next": {**random_obs(obs_type, n, generator=g), "terminated": torch.zeros(n, 1, dtype=torch.bool)},
    }, batch_size=[n])
