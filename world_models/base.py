"""The world-model interface shared by every agent family (DESIGN.md, "world_models — one interface")."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.distributions import Distribution

__all__ = ["CAPABILITIES", "WorldModel"]

CAPABILITIES = frozenset({"encode", "transition", "successor", "decode", "sequence"})


class WorldModel(nn.Module):
    """A model of observations in latent space.

    ``capabilities`` names the optional methods a model implements; calling one it lacks raises
    ``NotImplementedError`` naming the model and the capability.
    """

    capabilities: frozenset[str] = frozenset()

    def loss(self, batch: TensorDict) -> TensorDict:
        """Training loss: key ``"loss"`` plus named terms for logging."""
        raise NotImplementedError(f"{type(self).__name__} has no loss of its own")

    def encode(self, obs: TensorDict) -> Tensor:
        """Observation -> latent (the mean of the belief where the model is stochastic)."""
        raise self._missing("encode")

    def transition(self, latent: Tensor, action: Tensor) -> Tensor | Distribution:
        raise self._missing("transition")

    def imagine(self, latent: Tensor, actions: Tensor) -> Tensor:
        """Roll :meth:`transition` over ``actions`` ``[B, T, A]``; returns latents ``[B, T, D]``."""
        if "transition" not in self.capabilities:
            raise self._missing("transition")
        out = []
        for t in range(actions.shape[1]):
            nxt = self.transition(latent, actions[:, t])
            latent = nxt.mean if isinstance(nxt, Distribution) else nxt
            out.append(latent)
        return torch.stack(out, dim=1)

    def successor(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        raise self._missing("successor")

    def decode(self, latent: Tensor) -> TensorDict:
        raise self._missing("decode")

    def _missing(self, capability: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} has no {capability!r} capability "
            f"(it has: {sorted(self.capabilities) or 'none'})"
        )
