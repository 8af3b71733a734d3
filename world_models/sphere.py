"""Sphere normalisation: latents and task vectors on the sphere of radius ``sqrt(d)``.

TD-JEPA and FB (Touati & Ollivier, 2021; Bagatella et al., 2025) normalise encoder outputs and task
vectors ``z`` with ``x -> sqrt(d) * x / ||x||`` (the reference code's ``Norm`` / ``project_z``), so that
a ``d``-dimensional latent has the norm of a standard Gaussian vector and the diagonal of the
orthonormality loss is constant. Task vectors for pre-training are drawn uniformly on that sphere,
half of them replaced by the normalised embeddings of states from the same batch
(:func:`sample_mixed_z`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SphereNorm", "project_to_sphere", "sample_mixed_z", "sample_sphere"]


def project_to_sphere(x: Tensor) -> Tensor:
    """``sqrt(d) * x / ||x||`` along the last dim (``[*, d]``); the zero vector stays zero."""
    return math.sqrt(x.shape[-1]) * F.normalize(x, dim=-1)


class SphereNorm(nn.Module):
    """:func:`project_to_sphere` as a layer (the reference code's ``Norm``)."""

    def forward(self, x: Tensor) -> Tensor:
        return project_to_sphere(x)


def sample_sphere(n: int, dim: int, *, device: str | torch.device = "cpu",
                  generator: torch.Generator | None = None) -> Tensor:
    """``n`` vectors ``[n, dim]`` uniform on the sphere of radius ``sqrt(dim)`` (normalised Gaussians)."""
    return project_to_sphere(torch.randn(n, dim, device=device, generator=generator))


@torch.no_grad()
def sample_mixed_z(goals: Tensor, goal_ratio: float) -> tuple[Tensor, Tensor]:
    """Pre-training task vectors ``[B, d]``: uniform on the sphere, or (with probability ``goal_ratio``
    per row) the projected embedding of a randomly permuted state of the batch.

    ``goals`` ``[B, d]`` are embeddings of the batch's next states (TD-JEPA's ``psi(s')``, FB's
    ``B(s')``); they are permuted so that a row's goal is not its own next state. Returns ``z`` and a
    bool mask ``[B]`` of the rows that hold a goal. [TDJ agents/td_jepa/agent.py ``sample_mixed_z``]
    """
    batch, dim = goals.shape
    z = sample_sphere(batch, dim, device=goals.device).to(goals.dtype)
    perm = torch.randperm(batch, device=goals.device)
    is_goal = torch.rand(batch, device=goals.device) < goal_ratio
    z = torch.where(is_goal[:, None], project_to_sphere(goals[perm]), z)
    return z, is_goal
