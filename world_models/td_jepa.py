"""TD-JEPA's latent-predictive model: two sphere-normalised encoders and two policy-conditioned predictors.

Bagatella et al., "TD-JEPA" (arXiv:2510.00739), §3 and the reference code ``facebookresearch/td_jepa``
(``metamotivo/nn_models.py``, ``agents/td_jepa/model.py``); ``algorithms/td_jepa.md`` §2 lists every
layer. The model holds

- the state encoder ``phi: S -> R^{d_phi}`` and the task encoder ``psi: S -> R^{d_psi}``, each a trunk
  (the DrQ-v2 conv net with a Linear-LayerNorm-Tanh projection for pixels, nothing for states)
  followed by an MLP head ending in :class:`~latentrl.world_models.sphere.SphereNorm`;
- the predictors ``T_phi(phi(s), a, z) -> R^{d_psi}`` (the successor features of ``psi`` under the
  policy ``pi_z``) and ``T_psi(psi(s), a, z) -> R^{d_phi}``, each an ensemble of ``E`` members whose
  outputs are ``[E, B, out]``.

The symmetric variant has one encoder (``psi = phi``) and no ``T_psi``. The model owns its loss
(:meth:`TDJEPAModel.loss`: the cross TD predictive losses and the orthonormality regularisers) and
the EMA target copies of the heads and predictors it bootstraps from; the agent owns the
optimizers, the actor and the order of the steps. FB, built from the same pieces, is
``world_models/fb.py``.
"""

from __future__ import annotations

import copy

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.encoders import RandomShiftsAug
from latentrl.world_models.layers import gather_batch, local_rows, soft_update_params
from latentrl.world_models.sphere import sample_mixed_z
from latentrl.world_models.zero_shot import ForwardMap, LatentEncoder, NextAction, ZeroShotModel, orthonormality_loss

__all__ = ["TDJEPAModel", "effective_rank", "predictive_loss"]


def predictive_loss(predictions: Tensor, target: Tensor) -> Tensor:
    """TD-JEPA's regression loss: squared error summed over features, mean over ensemble and batch.

    ``predictions`` ``[E, B, D]``, ``target`` ``[B, D]`` (the code's ``(preds - target).pow(2).sum(-1).mean()``,
    twice the paper's ``1/(2B) sum ||.||^2`` per member). [TDJ agents/td_jepa/agent.py]
    """
    return (predictions - target).square().sum(-1).mean()


@torch.no_grad()
def effective_rank(x: Tensor) -> Tensor:
    """``exp(entropy)`` of the normalised eigenvalues of ``x^T x / N`` for rows ``x`` ``[N, d]``: from 1
    (collapsed) to d (isotropic). TD-JEPA's health check wants ``> d / 2`` for ``psi`` (§12)."""
    eigvals = torch.linalg.eigvalsh((x.T @ x).double() / x.shape[0]).clamp_min(0.0)
    p = eigvals / eigvals.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()).to(x.dtype)


class TDJEPAModel(ZeroShotModel):
    """TD-JEPA's encoders ``phi``, ``psi`` and predictors ``T_phi``, ``T_psi`` as a world model.

    - ``encode(obs)``: ``phi(s)`` ``[B, d_phi]`` (norm ``sqrt(d_phi)``), the policy's input.
    - ``encode_task(obs)``: ``psi(s)`` ``[B, d_psi]`` (norm ``sqrt(d_psi)``), the space of task vectors ``z``.
    - ``successor(latent, action, z)``: ``T_phi(phi, a, z)`` ``[E, B, d_psi]``, the successor features of
      ``psi`` under ``pi_z``; ``Q(s, a, z) = mean_e T_phi(...)[e]^T z``. Not a next-latent model.
    - ``predict_phi(psi, action, z)``: ``T_psi`` ``[E, B, d_phi]`` (asymmetric models only).
    - ``loss(batch, next_action)``: the TD-JEPA objective (§3, §4); ``targets`` holds the EMA copies
      of the heads and predictors (not of the conv trunks), moved by :meth:`update_targets`.

    ``psi_encoder=None`` makes the symmetric variant (``psi = phi``). ``obs_key`` is ``"pixels"``
    (stacked frames ``[B, 3k, H, W]`` uint8) or ``"state"``.
    """

    def __init__(self, phi_encoder: LatentEncoder, phi_predictor: ForwardMap, *,
                 psi_encoder: LatentEncoder | None = None, psi_predictor: ForwardMap | None = None,
                 obs_key: str = "state", aug: RandomShiftsAug | None = None, discount: float = 0.98,
                 phi_ortho_coef: float = 0.1, psi_ortho_coef: float = 0.1, train_goal_ratio: float = 0.5,
                 encoder_target_tau: float = 1e-3, predictor_target_tau: float = 1e-3):
        super().__init__(obs_key, aug)
        self.phi_encoder, self.phi_predictor = phi_encoder, phi_predictor
        self.psi_encoder, self.psi_predictor = psi_encoder, psi_predictor
        self.phi_dim = phi_encoder.dim
        self.discount, self.train_goal_ratio = float(discount), float(train_goal_ratio)
        self.phi_ortho_coef, self.psi_ortho_coef = float(phi_ortho_coef), float(psi_ortho_coef)
        self.encoder_target_tau, self.predictor_target_tau = float(encoder_target_tau), float(predictor_target_tau)
        self.targets = nn.ModuleDict()

    def make_targets(self) -> None:
        """(Re)create the EMA targets as copies of the online heads and predictors (after initialisation)."""
        online = {"phi_head": self.phi_encoder.head, "phi_predictor": self.phi_predictor}
        if not self.symmetric:
            online |= {"psi_head": self.psi_encoder.head, "psi_predictor": self.psi_predictor}
        self.targets = nn.ModuleDict({k: copy.deepcopy(m).requires_grad_(False) for k, m in online.items()})

    @property
    def symmetric(self) -> bool:
        return self.psi_encoder is None

    @property
    def psi(self) -> LatentEncoder:
        """The task encoder (``phi`` itself in the symmetric variant)."""
        return self.phi_encoder if self.psi_encoder is None else self.psi_encoder

    @property
    def state_encoder(self) -> LatentEncoder:
        return self.phi_encoder

    @property
    def task_encoder(self) -> LatentEncoder:
        return self.psi

    def successor(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        """``T_phi(phi(s), a, z)`` ``[E, B, d_psi]``."""
        return self.phi_predictor(latent, action, z)

    def predict_phi(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        """``T_psi(psi(s), a, z)`` ``[E, B, d_phi]``."""
        if self.psi_predictor is None:
            raise NotImplementedError(f"{type(self).__name__} has no T_psi (symmetric variant)")
        return self.psi_predictor(latent, action, z)

    def q_value(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        """``Q(s, a, z) = mean_e T_phi(phi(s), a, z)[e]^T z`` ``[B]``."""
        return (self.successor(latent, action, z) * z).sum(-1).mean(0)

    # ------------------------------------------------------------------------------------ loss
    def trunk_features(self, obs: Tensor, next_obs: Tensor) -> dict[str, Tensor]:
        """Trunk features of (augmented) inputs: ``phi``/``psi`` of ``s`` with gradients, of ``s'`` without.

        Keys ``phi``, ``psi``, ``next_phi``, ``next_psi``, each ``[B, feature]`` (the state itself for
        states; ``psi`` is ``phi`` in the symmetric variant).
        """
        out = {"phi": self.phi_encoder.trunk(obs)}
        with torch.no_grad():
            out["next_phi"] = self.phi_encoder.trunk(next_obs)
            out["next_psi"] = out["next_phi"] if self.symmetric else self.psi.trunk(next_obs)
        out["psi"] = out["phi"] if self.symmetric else self.psi.trunk(obs)
        return out

    @torch.no_grad()
    def sample_z(self, next_psi_features: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-training ``z`` ``[B, d_psi]`` and the mask of goal rows (§4), from trunk features of ``s'``.

        Goals are permuted rows of the whole batch: under data-parallel training the ``z`` of the global
        batch is drawn from every rank's goals (``gather_batch``) and each rank keeps its own rows."""
        z, is_goal = sample_mixed_z(gather_batch(self.psi.head(next_psi_features)), self.train_goal_ratio)
        return local_rows(z), local_rows(is_goal)

    @torch.no_grad()
    def td_targets(self, next_phi_features: Tensor, next_psi_features: Tensor, z: Tensor, discount: Tensor,
                   next_action: NextAction) -> dict[str, Tensor]:
        """The cross TD targets (§3): ``phi`` ``[B, d_psi]`` (for ``T_phi``) and, asymmetric, ``psi``
        ``[B, d_phi]`` (for ``T_psi``), plus the next action ``action`` ``[B, A]`` they used.

        ``discount`` ``[B, 1]`` holds ``gamma * (1 - terminated')``; ``next_action(phi(s'), z)`` is ``pi_z``.
        """
        targets = self.targets
        next_phi = targets["phi_head"](next_phi_features)
        next_psi = next_phi if self.symmetric else targets["psi_head"](next_psi_features)
        action = next_action(next_phi, z)
        out = {"action": action,
               "phi": next_psi + discount * targets["phi_predictor"](next_phi, action, z).mean(0)}
        if not self.symmetric:
            out["psi"] = next_phi + discount * targets["psi_predictor"](next_psi, action, z).mean(0)
        return out

    def loss(self, batch: TensorDict, next_action: NextAction) -> TensorDict:
        """TD-JEPA's representation loss on a replay batch ``[B]`` (``obs_key``, ``action``, ``next``).

        ``T_phi(phi(s), a, z)`` regresses ``psi-(s') + gamma_t mean_e T_phi-(phi-(s'), a', z)`` and,
        asymmetric, ``T_psi(psi(s), a, z)`` regresses ``phi-(s') + gamma_t mean_e T_psi-(psi-(s'), a', z)``
        with ``a' = next_action(phi-(s'), z)`` and ``z`` from :meth:`sample_z`; plus the orthonormality
        regulariser of ``phi`` (and ``psi``). Returns ``loss`` and its terms, and for the agent's
        actor step ``z`` ``[B, d]`` and ``phi_features`` (the trunk features of ``s``, detached).
        """
        obs, next_obs, action, discount = self.training_inputs(batch, self.discount)
        h = self.trunk_features(obs, next_obs)
        z, is_goal = self.sample_z(h["next_psi"])
        target = self.td_targets(h["next_phi"], h["next_psi"], z, discount, next_action)

        phi = self.phi_encoder.head(h["phi"])
        phi_loss = predictive_loss(self.phi_predictor(phi, action, z), target["phi"])
        # The regulariser pairs rows: over the global batch under data-parallel training (gather_batch).
        phi_reg, _, phi_offdiag = orthonormality_loss(gather_batch(phi, grad=True))
        loss = phi_loss + self.phi_ortho_coef * phi_reg
        out = {"phi_loss": phi_loss, "phi_ortho_loss": phi_reg, "phi_ortho_offdiag": phi_offdiag,
               "phi_norm": phi.norm(dim=-1).mean()}
        if self.symmetric:
            psi = phi
        else:
            psi = self.psi_encoder.head(h["psi"])
            psi_loss = predictive_loss(self.psi_predictor(psi, action, z), target["psi"])
            psi_reg, _, psi_offdiag = orthonormality_loss(gather_batch(psi, grad=True))
            loss = loss + psi_loss + self.psi_ortho_coef * psi_reg
            out |= {"psi_loss": psi_loss, "psi_ortho_loss": psi_reg, "psi_ortho_offdiag": psi_offdiag,
                    "psi_norm": psi.norm(dim=-1).mean()}
        out |= {"loss": loss, "td_target_phi": target["phi"].mean(), "z_goal_fraction": is_goal.float().mean(),
                "psi_effective_rank": effective_rank(psi.detach())}
        return TensorDict({**out, "z": z, "phi_features": h["phi"].detach()}, batch_size=[])

    def update_targets(self) -> None:
        """EMA of the heads (``encoder_target_tau``) and predictors (``predictor_target_tau``)."""
        soft_update_params(self.phi_encoder.head, self.targets["phi_head"], self.encoder_target_tau)
        soft_update_params(self.phi_predictor, self.targets["phi_predictor"], self.predictor_target_tau)
        if not self.symmetric:
            soft_update_params(self.psi_encoder.head, self.targets["psi_head"], self.encoder_target_tau)
            soft_update_params(self.psi_predictor, self.targets["psi_predictor"], self.predictor_target_tau)

    def extra_repr(self) -> str:
        return f"obs_key={self.obs_key!r}, phi_dim={self.phi_dim}, z_dim={self.z_dim}, symmetric={self.symmetric}"
