"""The world-model interface shared by every agent family (DESIGN.md, "world_models — one interface").

Every world model lives in ``world_models/``, one module per model, and owns its loss: agents call
``world_model.loss(batch)`` and do not re-implement it. Two shapes of model share this base class:

- **feed-forward** models (TD-JEPA, FB, METRA's temporal distance, StaMo's tokens): ``encode``,
  ``successor``, ``decode``;
- **recurrent / state-space** models (deep active inference, PV-RNN): a belief *state* held in a
  TensorDict ``[B]`` (never in hidden attributes), ``initial_state`` / ``observe`` (posterior) /
  ``predict`` (one prior step, *sampled*) / ``imagine`` (sampled rollouts) and, for PV-RNN, ``infer``
  (error regression).

``capabilities`` names the optional methods a model implements; calling one it lacks raises
``NotImplementedError`` naming the model and the capability.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor, nn

__all__ = ["CAPABILITIES", "WorldModel"]

CAPABILITIES = frozenset({"encode", "transition", "successor", "decode", "sequence", "infer"})
"""``encode``: obs -> latent; ``successor``: successor features / measures of a policy; ``decode``:
latent -> obs; ``sequence``: a recurrent belief (``initial_state``, ``observe``, ``predict``,
``imagine``); ``transition``: a one-step latent dynamics model usable by ``imagine``; ``infer``:
PV-RNN's error regression."""


class WorldModel(nn.Module):
    """A model of observations in latent space; see the module docstring for the two shapes of model."""

    capabilities: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.capabilities) - CAPABILITIES
        if unknown:
            raise TypeError(f"{cls.__name__} declares unknown capabilities {sorted(unknown)}; "
                            f"valid: {sorted(CAPABILITIES)}")

    # ------------------------------------------------------------------------------- every model
    def loss(self, batch: TensorDict, *args, **kwargs) -> TensorDict:
        """Training loss of a replay batch: key ``"loss"`` (the scalar to minimise) plus named terms
        for logging. Models whose targets follow a policy take what they need of it as arguments
        (TD-JEPA and FB: the next-action sampler)."""
        raise NotImplementedError(f"{type(self).__name__} implements no loss; every world model owns one")

    # -------------------------------------------------------------------------- feed-forward models
    def encode(self, obs: TensorDict) -> Tensor:
        """Observation ``[B]`` -> latent ``[B, ...]`` (tokens may be ``[B, N, D]``)."""
        raise self._missing("encode")

    def successor(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        raise self._missing("successor")

    def decode(self, latent: Tensor) -> TensorDict:
        """Latent -> observation keys (StaMo: the flow sampler)."""
        raise self._missing("decode")

    def transition(self, latent: Tensor, action: Tensor) -> Tensor:
        """One latent dynamics step ``[B, D], [B, A] -> [B, D]`` (a sample where the model is stochastic)."""
        raise self._missing("transition")

    # ---------------------------------------------------------------------------- recurrent models
    def initial_state(self, batch_size: int) -> TensorDict:
        """The belief ``[batch_size]`` before any observation (what rows with ``is_first`` restart from)."""
        raise self._missing("sequence")

    def observe(self, state: TensorDict, obs: TensorDict, prev_action: Tensor, is_first: Tensor) -> TensorDict:
        """Posterior belief ``[B]`` after seeing ``obs``; rows with ``is_first`` restart from ``initial_state``."""
        raise self._missing("sequence")

    def predict(self, state: TensorDict, action: Tensor) -> TensorDict:
        """One prior step ``[B]``, SAMPLED from the transition distribution (not its mean)."""
        raise self._missing("sequence")

    def imagine(self, state: TensorDict, actions: Tensor, num_samples: int = 1) -> TensorDict:
        """Sampled rollouts: ``actions`` ``[B, H, A]`` -> states ``[B * num_samples, H]``.

        Each step is :meth:`predict` (sampled); with ``num_samples`` > 1 the belief of each row is
        repeated (``repeat_interleave``: rows ``b * num_samples .. (b + 1) * num_samples - 1`` belong to
        row ``b``) and the samples diverge. Models with only ``transition`` roll latents ``[B, D]``
        through it and return ``{"latent": [B * num_samples, H, D]}``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if actions.dim() != 3:
            raise ValueError(f"actions must be [B, H, A], got {list(actions.shape)}")
        actions = actions.repeat_interleave(num_samples, dim=0)
        if "sequence" in self.capabilities:
            state = state.repeat_interleave(num_samples, dim=0) if num_samples > 1 else state
            steps = []
            for t in range(actions.shape[1]):
                state = self.predict(state, actions[:, t])
                steps.append(state)
            return torch.stack(steps, dim=1)
        if "transition" in self.capabilities:
            latent = state["latent"] if isinstance(state, TensorDict) else state
            latent = latent.repeat_interleave(num_samples, dim=0)
            out = []
            for t in range(actions.shape[1]):
                latent = self.transition(latent, actions[:, t])
                out.append(latent)
            stacked = torch.stack(out, dim=1)
            return TensorDict({"latent": stacked}, batch_size=stacked.shape[:2])
        raise self._missing("sequence")

    def infer(self, window: TensorDict, state: TensorDict, iters: int) -> TensorDict:
        """PV-RNN's error regression: optimise latent variables to explain a window ``[B, T]`` of observations."""
        raise self._missing("infer")

    def _missing(self, capability: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} has no {capability!r} capability "
            f"(it has: {sorted(self.capabilities) or 'none'})"
        )
