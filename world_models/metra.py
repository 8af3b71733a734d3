"""METRA's temporal-distance model ``phi`` (Park, Rybkin & Levine, ICLR 2024) and its objective.

``phi: S -> R^D`` is trained so that one environment step moves at most a bounded distance in latent
space (the temporal-distance Lipschitz constraint ``mean_d (phi(s') - phi(s))_d**2 <= 1``), while
skills' directions ``z`` are followed as far as possible: the intrinsic reward is
``r = (phi(s') - phi(s))^T z``. The model owns the objective and its dual variable ``lambda``
(:meth:`TemporalDistanceModel.loss`), as the official code (``seohongpark/METRA`` ``iod/metra.py``)
computes them; the agent (``latentrl.agents.metra``) owns the SAC skill policy and the optimisers.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import read_key
from latentrl.world_models.layers import RunningMeanStd, mlp, xavier_init

__all__ = ["ObservationNormalizer", "TemporalDistanceModel", "constraint_penalty", "metra_reward"]


def metra_reward(phi_s: Tensor, phi_next: Tensor, skill: Tensor, discrete: bool) -> Tensor:
    """Intrinsic reward ``[B]``: ``(phi(s') - phi(s))^T z``; for one-hot ``z`` the zero-centred form
    ``sum_d dphi_d (z_d - mean(z)) D / (D - 1)``."""
    delta = phi_next - phi_s
    if discrete:
        dim = skill.shape[-1]
        skill = (skill - skill.mean(dim=-1, keepdim=True)) * dim / (dim - 1 if dim > 1 else 1)
    return (delta * skill).sum(dim=-1)


def constraint_penalty(phi_s: Tensor, phi_next: Tensor, slack: float) -> tuple[Tensor, Tensor]:
    """``(c, d)`` ``[B]`` each: the squared latent step ``d = mean_d (phi(s') - phi(s))_d**2`` and the
    constraint term ``c = min(slack, 1 - d)`` (negative while the constraint ``d <= 1`` is violated)."""
    dist = (phi_next - phi_s).square().mean(dim=-1)
    return torch.clamp(1.0 - dist, max=slack), dist


class ObservationNormalizer(nn.Module):
    """Per-feature ``(x - mean) / std`` of state vectors with statistics fixed after a warm-up.

    METRA's state runs normalise observations with a preset mean / std measured on random rollouts
    (``--normalizer_type preset``). Here the statistics are folded from the first ``warmup`` update
    batches (drawn from the data collected before training starts, by the near-random initial
    policy) and then frozen. ``warmup = 0`` (and pixels) is the identity.
    """

    def __init__(self, dim: int | None, warmup: int):
        super().__init__()
        self.warmup = int(warmup) if dim is not None else 0
        self.rms = RunningMeanStd((dim,)) if self.warmup > 0 else None
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    @property
    def frozen(self) -> bool:
        return self.rms is None or int(self.batches) >= self.warmup

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold a batch ``[B, D]`` into the statistics during the warm-up."""
        if not self.frozen:
            self.rms.update(x.float().reshape(-1, x.shape[-1]))
            self.batches += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.rms is None:
            return x
        return self.rms.normalize(x.float(), eps=1e-8)


class TemporalDistanceModel(WorldModel):
    """METRA's ``phi`` (the official ``traj_encoder``): its own encoder, then a ReLU MLP to ``R^D``.

    ``encode(obs)`` reads ``obs[obs_key]`` (stacked ``pixels`` ``[*, 3k, H, W]``, ``state`` or
    ``physics`` ``[*, P]``) and returns ``phi(s)`` ``[*, D]``; ``phi(x)`` does the same on the raw tensor
    ``[B, ...]``. ``normalizer`` (state inputs) is applied first; the policy and the Qs read the same
    normalised input. Only the mean head of the official Gaussian module exists (its std head is
    unused there).
    """

    capabilities = frozenset({"encode"})

    def __init__(self, encoder: nn.Module, obs_key: str, dim_option: int, hidden_dims: list[int],
                 normalizer: ObservationNormalizer | None = None, *, discrete: bool = False,
                 dual_slack: float = 1e-3, dual_lambda_init: float = 30.0):
        super().__init__()
        self.encoder = encoder
        self.normalizer = normalizer if normalizer is not None else ObservationNormalizer(None, 0)
        self.head = mlp(encoder.repr_dim, hidden_dims, dim_option)
        self.head.apply(xavier_init)
        self.obs_key = obs_key
        self.dim_option = dim_option
        self.discrete, self.dual_slack = bool(discrete), float(dual_slack)
        self.log_lambda = nn.Parameter(torch.tensor(math.log(dual_lambda_init)))

    def phi_parameters(self) -> list[nn.Parameter]:
        """The parameters of ``phi`` (encoder and head): everything but the dual variable."""
        return [*self.encoder.parameters(), *self.head.parameters()]

    def phi(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.normalizer(x)))

    def encode(self, obs: TensorDict) -> Tensor:
        x = read_key(obs, self.obs_key, "METRA's phi")
        event_dims = 3 if self.obs_key == "pixels" else 1
        batch_shape = x.shape[: x.dim() - event_dims]
        return self.phi(x.reshape(-1, *x.shape[x.dim() - event_dims:])).reshape(*batch_shape, -1)

    def forward(self, obs: TensorDict) -> Tensor:
        return self.encode(obs)

    def inputs(self, batch: TensorDict) -> tuple[Tensor, Tensor, Tensor]:
        """``(s, s', z)``: ``obs_key`` and ``("next", obs_key)`` ``[B, ...]`` and ``skill`` ``[B, D]`` of a batch."""
        if "skill" not in batch.keys():
            raise KeyError(
                "METRA's update needs the 'skill' the METRA policy stores with each step (policy.extras()); "
                f"the batch has keys {sorted(map(str, batch.keys()))}. Collect data with agent.policy(explore=True)."
            )
        return batch[self.obs_key], batch["next", self.obs_key], batch["skill"].float()

    @torch.no_grad()
    def reward(self, x: Tensor, x_next: Tensor, skill: Tensor) -> Tensor:
        """The intrinsic reward ``[B]`` ``(phi(s') - phi(s))^T z`` of raw inputs (no gradient)."""
        return metra_reward(*self.phi(torch.cat([x, x_next])).chunk(2), skill, self.discrete)

    def loss(self, batch: TensorDict) -> TensorDict:
        """METRA's representation objective and its dual, on a replay batch ``[B]`` with ``skill``.

        ``phi`` maximises ``E[r + lambda * min(eps, 1 - mean_d dphi_d**2)]`` with ``lambda`` detached, and
        the dual variable minimises ``log_lambda * E[c]`` with ``c`` detached, so ``lambda`` rises while
        the constraint is violated. ``loss`` is the sum of the two (their gradients touch disjoint
        parameters: ``phi_loss`` reaches ``phi_parameters()``, ``lambda_loss`` only ``log_lambda``), so
        one backward serves both optimisers exactly as two separate steps would.
        """
        x, x_next, skill = self.inputs(batch)
        phi_s, phi_next = self.phi(torch.cat([x, x_next])).chunk(2)
        reward = metra_reward(phi_s, phi_next, skill, self.discrete)
        penalty, sq_dist = constraint_penalty(phi_s, phi_next, self.dual_slack)
        phi_objective = reward + self.log_lambda.exp().detach() * penalty
        phi_loss = -phi_objective.mean()
        lambda_loss = self.log_lambda * penalty.detach().mean()
        return TensorDict({
            "loss": phi_loss + lambda_loss, "phi_loss": phi_loss, "lambda_loss": lambda_loss,
            "phi_objective": phi_objective.mean(), "constraint": sq_dist.mean(),
            "constraint_penalty": penalty.mean(), "lambda": self.log_lambda.exp(),
        }, batch_size=[])
