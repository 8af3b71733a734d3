"""METRA's temporal-distance model ``phi`` (Park, Rybkin & Levine, ICLR 2024) and its objective.

``phi: S -> R^D`` is trained so that one environment step moves at most a bounded distance in latent
space (the temporal-distance Lipschitz constraint ``mean_d (phi(s') - phi(s))_d**2 <= 1``), while
skills' directions ``z`` are followed as far as possible: the intrinsic reward is
``r = (phi(s') - phi(s))^T z``. The model owns the objective and its dual variable ``lambda``
(:meth:`TemporalDistanceModel.loss`), as the official code (``seohongpark/METRA`` ``iod/metra.py``)
computes them; the agent (``latentrl.agents.metra``) owns the SAC skill policy and the optimisers.

The same learner runs METRA's two baselines as the official code does, by three switches
(``tests/main.py`` flags; ``METRAConfig.objective`` names the combinations):

- ``inner`` (``--inner``): the reward is the inner product ``(phi(s') - phi(s))^T z`` (1) or, as in DIAYN
  (0), the log-likelihood of the skill under ``q(z | s') = N(phi(s'), std(s')^2)`` (a second, log-std MLP
  on the same encoder; one-hot skills: ``-cross_entropy(phi(s'), argmax z)``). Either way ``phi``
  maximises the reward's batch mean (``LossTe = -mean(te_obj)``).
- ``dual_reg`` (``--dual_reg``): add ``lambda * min(eps, 1 - mean_d dphi_d**2)`` to ``phi``'s objective
  and learn ``lambda`` (METRA); off for LSD and DIAYN (``lambda`` then stays at its initial value).
- ``spectral_norm`` (``--spectral_normalization``): spectral normalisation (one power iteration per
  forward pass in training mode) of every Linear / Conv2d layer of ``phi``'s encoder and heads; LSD's
  1-Lipschitz ``phi``. With it, ``phi(s)`` and ``phi(s')`` are computed by two calls, as the official code
  does, so that each update runs the official number of power iterations (two before ``phi``'s step,
  two after it, when the rewards are recomputed).

LSD = ``inner``, no ``dual_reg``, ``spectral_norm``; DIAYN = not ``inner``, no ``dual_reg`` (with
``unit_length`` off, a skill policy concern: Gaussian skills ``z ~ N(0, I)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import read_key
from latentrl.world_models.layers import RunningMeanStd, mlp, xavier_init

__all__ = ["ObservationNormalizer", "TemporalDistanceModel", "constraint_penalty", "metra_reward",
           "skill_log_likelihood"]

MIN_STD = 1e-6
"""Lower clamp of the std of DIAYN's skill posterior ``q(z | s')`` (the official ``min_std``)."""


def metra_reward(phi_s: Tensor, phi_next: Tensor, skill: Tensor, discrete: bool) -> Tensor:
    """Intrinsic reward ``[B]``: ``(phi(s') - phi(s))^T z``; for one-hot ``z`` the zero-centred form
    ``sum_d dphi_d (z_d - mean(z)) D / (D - 1)``."""
    delta = phi_next - phi_s
    if discrete:
        dim = skill.shape[-1]
        skill = (skill - skill.mean(dim=-1, keepdim=True)) * dim / (dim - 1 if dim > 1 else 1)
    return (delta * skill).sum(dim=-1)


def skill_log_likelihood(mean: Tensor, log_std: Tensor | None, skill: Tensor, discrete: bool) -> Tensor:
    """DIAYN's reward ``[B]``: ``log q(z | s')``. Continuous skills: a diagonal Gaussian with ``mean`` and
    ``exp(log_std)`` (``log_std`` clamped below at ``log 1e-6``), summed over dims; one-hot skills:
    ``log softmax(mean)`` at the skill's index (``-cross_entropy``; ``log_std`` unused)."""
    if discrete:
        return -F.cross_entropy(mean, skill.argmax(dim=-1), reduction="none")
    std = log_std.clamp(min=math.log(MIN_STD)).exp()
    return torch.distributions.Normal(mean, std).log_prob(skill).sum(dim=-1)


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
        self._known_frozen = False  # once frozen it stays so (until a state dict loads): no host sync per update

    @property
    def frozen(self) -> bool:
        """Whether the warm-up is over; reads the batch count from the device only until it is."""
        if not self._known_frozen:
            self._known_frozen = self.rms is None or int(self.batches) >= self.warmup
        return self._known_frozen

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._known_frozen = False  # the loaded count decides again
        super()._load_from_state_dict(*args, **kwargs)

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
    normalised input. With ``inner`` (METRA, LSD) only the mean head of the official Gaussian module
    exists (its std head is unused there); without it (DIAYN) ``log_std_head``, a ReLU MLP of the same
    widths on the same encoder, gives the log-std of ``q(z | s')`` (output bias ``log 1 = 0``).
    ``dual_reg`` and ``spectral_norm``: see the module docstring.
    """

    capabilities = frozenset({"encode"})

    def __init__(self, encoder: nn.Module, obs_key: str, dim_option: int, hidden_dims: list[int],
                 normalizer: ObservationNormalizer | None = None, *, discrete: bool = False,
                 dual_slack: float = 1e-3, dual_lambda_init: float = 30.0, inner: bool = True,
                 dual_reg: bool = True, spectral_norm: bool = False):
        super().__init__()
        if dual_reg and not inner:
            raise ValueError("METRA's dual regulariser constrains phi(s') - phi(s), which only the inner-product "
                             "objective uses: dual_reg needs inner (DIAYN is inner=False with dual_reg=False)")
        self.encoder = encoder
        self.normalizer = normalizer if normalizer is not None else ObservationNormalizer(None, 0)
        self.head = mlp(encoder.repr_dim, hidden_dims, dim_option)
        self.head.apply(xavier_init)
        self.log_std_head = None
        if not inner:
            self.log_std_head = mlp(encoder.repr_dim, hidden_dims, dim_option)
            self.log_std_head.apply(xavier_init)  # output bias 0 = log(init_std = 1)
        self.obs_key = obs_key
        self.dim_option = dim_option
        self.discrete, self.dual_slack = bool(discrete), float(dual_slack)
        self.inner, self.dual_reg, self.spectral_norm = bool(inner), bool(dual_reg), bool(spectral_norm)
        self.log_lambda = nn.Parameter(torch.tensor(math.log(dual_lambda_init)))
        if self.spectral_norm:  # after the initialisation, as the official layers initialise weight_orig
            for part in (self.encoder, self.head, self.log_std_head):
                for layer in [] if part is None else list(part.modules()):
                    if isinstance(layer, (nn.Linear, nn.Conv2d)):
                        nn.utils.spectral_norm(layer)

    def phi_parameters(self) -> list[nn.Parameter]:
        """The parameters of ``phi`` (encoder, head and DIAYN's log-std head): everything but the dual variable."""
        extra = [] if self.log_std_head is None else list(self.log_std_head.parameters())
        return [*self.encoder.parameters(), *self.head.parameters(), *extra]

    def phi(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.normalizer(x)))

    def phi_pair(self, x: Tensor, x_next: Tensor) -> tuple[Tensor, Tensor]:
        """``(phi(s), phi(s'))``: one call on both, or two calls under spectral normalisation (each call
        runs one power iteration, and the official code makes two)."""
        if self.spectral_norm:
            return self.phi(x), self.phi(x_next)
        return self.phi(torch.cat([x, x_next])).chunk(2)

    def skill_posterior(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(mean, log_std)`` ``[B, D]`` of DIAYN's ``q(z | s)`` (``log_std`` None with ``inner``: no std head)."""
        h = self.encoder(self.normalizer(x))
        return self.head(h), None if self.log_std_head is None else self.log_std_head(h)

    def _reward(self, x: Tensor, x_next: Tensor, skill: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(reward, phi(s), phi(s'))`` with gradients; DIAYN (not ``inner``) reads ``s'`` only and returns
        ``phi(s)``, ``phi(s')`` as None."""
        if not self.inner:
            mean, log_std = self.skill_posterior(x_next)
            return skill_log_likelihood(mean, log_std, skill, self.discrete), None, None
        phi_s, phi_next = self.phi_pair(x, x_next)
        return metra_reward(phi_s, phi_next, skill, self.discrete), phi_s, phi_next

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
        """The intrinsic reward ``[B]`` of raw inputs (no gradient): ``(phi(s') - phi(s))^T z`` (METRA, LSD)
        or ``log q(z | s')`` (DIAYN)."""
        return self._reward(x, x_next, skill)[0]

    def loss(self, batch: TensorDict) -> TensorDict:
        """The representation objective and its dual, on a replay batch ``[B]`` with ``skill``.

        METRA: ``phi`` maximises ``E[r + lambda * min(eps, 1 - mean_d dphi_d**2)]`` with ``lambda`` detached,
        and the dual variable minimises ``log_lambda * E[c]`` with ``c`` detached, so ``lambda`` rises while
        the constraint is violated. ``loss`` is the sum of the two (their gradients touch disjoint
        parameters: ``phi_loss`` reaches ``phi_parameters()``, ``lambda_loss`` only ``log_lambda``), so
        one backward serves both optimisers exactly as two separate steps would. Without ``dual_reg``
        (LSD, DIAYN) ``phi`` maximises ``E[r]`` alone and ``lambda_loss`` is a constant 0 (no gradient:
        ``lambda`` is not stepped, as the official code skips its optimiser). DIAYN logs no constraint.
        """
        x, x_next, skill = self.inputs(batch)
        reward, phi_s, phi_next = self._reward(x, x_next, skill)
        out = {}
        phi_objective = reward
        lambda_loss = torch.zeros((), device=reward.device)
        if phi_s is not None:
            penalty, sq_dist = constraint_penalty(phi_s, phi_next, self.dual_slack)
            out = {"constraint": sq_dist.mean(), "constraint_penalty": penalty.mean()}
            if self.dual_reg:
                phi_objective = reward + self.log_lambda.exp().detach() * penalty
                lambda_loss = self.log_lambda * penalty.detach().mean()
        phi_loss = -phi_objective.mean()
        return TensorDict({
            "loss": phi_loss + lambda_loss, "phi_loss": phi_loss, "lambda_loss": lambda_loss,
            "phi_objective": phi_objective.mean(), **out, "lambda": self.log_lambda.exp(),
        }, batch_size=[])
