"""FB's forward-backward model (Touati & Ollivier, 2021) as configured in the TD-JEPA codebase.

A left encoder ``L`` (the policy's input), a backward map ``B`` (the space of task vectors ``z``) and
a forward map ``F(L(s), a, z) -> R^{d_z}`` so that ``F(s, a, z)^T B(s')`` is the successor measure of
``pi_z``. Built from the pieces of :mod:`latentrl.world_models.zero_shot`; for pixels ``L`` and ``B``
each have their own DrQ-v2 trunk (``fw`` and ``bw``), without target copies. The model owns the FB
loss (:meth:`FBModel.loss`) and the EMA targets of ``F``, ``L`` and ``B``; the agent
(``latentrl.agents.fb``) owns the actor and the optimizers. ``algorithms/td_jepa.md`` §7.
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

__all__ = ["FBModel", "fb_loss"]


def fb_loss(m: Tensor, target_m: Tensor, discount: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The FB temporal-difference loss on successor-measure matrices (§7).

    ``m`` ``[E, B, B]`` (``F(s_i, a_i, z_i)^T B(s'_j)``), ``target_m`` ``[B, B]``, ``discount`` ``[B, 1]``.
    Returns ``(loss, diag, offdiag)`` with ``diff = m - discount * target_m``,
    ``offdiag = 0.5 sum_{e, i != j} diff^2 / (B (B - 1))`` and ``diag = -E * mean_{e, i} diff[e, i, i]``.
    """
    ensemble, batch = m.shape[0], m.shape[-1]
    diff = m - discount * target_m
    diagonal = diff.diagonal(dim1=-2, dim2=-1)
    offdiag = 0.5 * (diff.square().sum() - diagonal.square().sum()) / (batch * (batch - 1))
    diag = -diagonal.mean() * ensemble
    return offdiag + diag, diag, offdiag


class FBModel(ZeroShotModel):
    """FB's ``L``, ``B`` and ``F`` as a world model.

    - ``encode(obs)``: ``L(fw(s))`` ``[B, d_L]``, the policy's input.
    - ``encode_task(obs)``: ``B(bw(s))`` ``[B, d_z]`` (norm ``sqrt(d_z)``), the space of task vectors ``z``.
    - ``successor(latent, action, z)``: ``F(L, a, z)`` ``[E, B, d_z]``; ``Q(s, a, z) = mean_e F[e]^T z``.
    - ``loss(batch, next_action)``: the FB temporal-difference loss plus the orthonormality of ``B``.
    """

    def __init__(self, left_encoder: LatentEncoder, backward_map: LatentEncoder, forward_map: ForwardMap, *,
                 obs_key: str = "state", aug: RandomShiftsAug | None = None, discount: float = 0.98,
                 ortho_coef: float = 1.0, train_goal_ratio: float = 0.5, f_target_tau: float = 1e-3,
                 b_target_tau: float = 1e-3):
        super().__init__(obs_key, aug)
        self.left_encoder, self.backward_map, self.forward_map = left_encoder, backward_map, forward_map
        self.discount, self.ortho_coef = float(discount), float(ortho_coef)
        self.train_goal_ratio = float(train_goal_ratio)
        self.f_target_tau, self.b_target_tau = float(f_target_tau), float(b_target_tau)
        self.targets = nn.ModuleDict()

    def make_targets(self) -> None:
        """(Re)create the EMA targets of ``L``'s head, ``F`` and ``B``'s head (after initialisation)."""
        online = {"left_head": self.left_encoder.head, "forward_map": self.forward_map,
                  "backward_head": self.backward_map.head}
        self.targets = nn.ModuleDict({k: copy.deepcopy(m).requires_grad_(False) for k, m in online.items()})

    @property
    def state_encoder(self) -> LatentEncoder:
        return self.left_encoder

    @property
    def task_encoder(self) -> LatentEncoder:
        return self.backward_map

    def successor(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        """``F(L, a, z)`` ``[E, B, d_z]``."""
        return self.forward_map(latent, action, z)

    @torch.no_grad()
    def fb_target_parts(self, next_left_features: Tensor, backward_features: Tensor, z: Tensor,
                        next_action: NextAction) -> tuple[Tensor, Tensor, Tensor]:
        """The target networks' ``F-(L-(s'), a', z)`` ``[E, B, d]`` and ``B-(s')`` ``[B, d]`` (the factors of
        :meth:`fb_target`), and the next actions ``a'`` ``[B, A]`` from ``next_action``."""
        targets = self.targets
        next_left = targets["left_head"](next_left_features)
        action = next_action(next_left, z)
        return targets["forward_map"](next_left, action, z), targets["backward_head"](backward_features), action

    @torch.no_grad()
    def fb_target(self, next_left_features: Tensor, backward_features: Tensor, z: Tensor,
                  next_action: NextAction) -> tuple[Tensor, Tensor]:
        """``M'`` ``[B, B]`` = ``mean_e F-(L-(s'), a', z)[e] B-(s')^T`` and the next actions ``[B, A]``."""
        target_f, target_b, action = self.fb_target_parts(next_left_features, backward_features, z, next_action)
        return (target_f @ target_b.T).mean(0), action

    def loss(self, batch: TensorDict, next_action: NextAction) -> TensorDict:
        """The FB loss on a replay batch ``[B]`` (``obs_key``, ``action``, ``next``); see ``agents/fb.py``.

        Returns ``loss`` and its terms, and for the agent's actor step ``z`` ``[B, d_z]`` and
        ``left_features`` (``fw(s)``, detached).
        """
        obs, next_obs, action, discount = self.training_inputs(batch, self.discount)
        h_fw = self.left_encoder.trunk(obs)
        with torch.no_grad():
            next_h_fw = self.left_encoder.trunk(next_obs)
        goal = self.backward_map.trunk(next_obs)
        with torch.no_grad():  # goals are permuted rows of the whole (global, under data parallelism) batch
            z, is_goal = sample_mixed_z(gather_batch(self.backward_map.head(goal)), self.train_goal_ratio)
            z, is_goal = local_rows(z), local_rows(is_goal)
        target_f, target_b, _ = self.fb_target_parts(next_h_fw, goal, z, next_action)

        f = self.forward_map(self.left_encoder.head(h_fw), action, z)  # [E, B, d]
        b = self.backward_map.head(goal)  # [B, d]
        # The loss pairs every F(s_i) with every B(s'_j): under data-parallel training each rank computes it on the
        # gathered global batch (gradients flow back to each rank's rows; gather_batch's docstring says why the
        # averaged gradient is then the single-process one). One process: the tensors themselves.
        f, b, discount = gather_batch(f.transpose(0, 1), grad=True).transpose(0, 1), gather_batch(b, grad=True), \
            gather_batch(discount)
        target_m = (gather_batch(target_f.transpose(0, 1)).transpose(0, 1) @ gather_batch(target_b).T).mean(0)
        fb, fb_diag, fb_offdiag = fb_loss(f @ b.T, target_m, discount)
        orth, orth_diag, orth_offdiag = orthonormality_loss(b)
        loss = fb + self.ortho_coef * orth
        return TensorDict({
            "loss": loss, "fb_loss": fb, "fb_diag": fb_diag, "fb_offdiag": fb_offdiag, "orth_loss": orth,
            "orth_loss_diag": orth_diag, "orth_loss_offdiag": orth_offdiag, "target_m": target_m.mean(),
            "b_norm": b.norm(dim=-1).mean(), "z_goal_fraction": is_goal.float().mean(),
            "z": z, "left_features": h_fw.detach(),
        }, batch_size=[])

    def update_targets(self) -> None:
        """EMA of ``F`` and ``L`` (``f_target_tau``) and of ``B`` (``b_target_tau``)."""
        soft_update_params(self.forward_map, self.targets["forward_map"], self.f_target_tau)
        soft_update_params(self.backward_map.head, self.targets["backward_head"], self.b_target_tau)
        soft_update_params(self.left_encoder.head, self.targets["left_head"], self.f_target_tau)
