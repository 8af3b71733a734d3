"""Network pieces shared by world models and agents: MLPs, initialisations, EMA targets, running statistics.

- :func:`mlp`: Linear -> ReLU stacks.
- :func:`weight_init` (orthogonal, DrQ-v2 / URLB) and :func:`xavier_init` (garage / METRA).
- :func:`soft_update_params`: Polyak averaging (EMA) of a target network.
- :class:`RunningMeanStd`: running mean / variance for normalisation.
- Diagonal Gaussians: :func:`gaussian_kl`, :func:`gaussian_log_prob`, :func:`gaussian_entropy`,
  :func:`gaussian_fuse` (the product of two Gaussians), used by the active inference model and agent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["RunningMeanStd", "gaussian_entropy", "gaussian_fuse", "gaussian_kl", "gaussian_log_prob", "mlp",
           "soft_update_params", "weight_init", "xavier_init"]

LOG_2PI = math.log(2.0 * math.pi)


def weight_init(module: nn.Module) -> None:
    """Orthogonal weights and zero biases for Linear; orthogonal with ReLU gain for convolutions.

    Use as ``net.apply(weight_init)``.
    """
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight.data)
        if module.bias is not None:
            module.bias.data.fill_(0.0)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.orthogonal_(module.weight.data, nn.init.calculate_gain("relu"))
        if module.bias is not None:
            module.bias.data.fill_(0.0)


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for Linear layers (garage's MLP default).

    Use as ``net.apply(xavier_init)``.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@torch.no_grad()
def soft_update_params(net: nn.Module, target: nn.Module, tau: float) -> None:
    """Polyak averaging ``target <- tau * net + (1 - tau) * target``, parameter by parameter."""
    for param, target_param in zip(net.parameters(), target.parameters(), strict=True):
        target_param.lerp_(param, tau)


class RunningMeanStd(nn.Module):
    """Running mean and variance over all samples seen (Chan et al.'s parallel update).

    Starts at mean 0, variance 1 and a pseudo-count ``epsilon`` (OpenAI baselines / URLB ``RMS``);
    the batch variance is the unbiased one, as URLB's. The statistics are buffers, so they travel
    with ``state_dict``.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(epsilon, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold in a batch ``[N, *shape]`` (N >= 2 for a variance; N = 1 updates the mean only)."""
        x = x.detach().reshape(-1, *self.mean.shape).to(self.mean.dtype)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(dim=0)
        batch_var = x.var(dim=0) if n > 1 else torch.zeros_like(batch_mean)
        total = self.count + n  # tensors throughout: no host sync on accelerators
        dtype = self.mean.dtype
        old_share, new_share = (self.count / total).to(dtype), (n / total).to(dtype)
        delta = batch_mean - self.mean
        self.mean.add_(delta * new_share)
        # Pooled M2 / total: within-batch parts plus the between-batch term count * n / total * delta^2.
        self.var.copy_(self.var * old_share + batch_var * new_share + delta.square() * old_share * new_share)
        self.count.copy_(total)

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def normalize(self, x: Tensor, clip: float | None = None, eps: float = 1e-8) -> Tensor:
        """``(x - mean) / sqrt(var + eps)``, optionally clipped to ``[-clip, clip]``."""
        out = (x - self.mean) / torch.sqrt(self.var + eps)
        return out.clamp(-clip, clip) if clip is not None else out


def mlp(in_dim: int, hidden_dims: tuple[int, ...] | list[int], out_dim: int) -> nn.Sequential:
    """Linear -> ReLU for each hidden width, then a final Linear to ``out_dim``."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden_dims:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------ diagonal Gaussians
# Each function takes means and standard deviations (not variances) and sums over the last dim.


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """``KL(N(mean_q, std_q^2) || N(mean_p, std_p^2))`` of diagonal Gaussians, summed over the last dim:
    ``sum_d log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2``."""
    var_q, var_p = std_q.square(), std_p.square()
    kl = torch.log(std_p) - torch.log(std_q) + (var_q + (mean_q - mean_p).square()) / (2.0 * var_p) - 0.5
    return kl.sum(-1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x; mean, std^2)`` of a diagonal Gaussian, summed over the last dim."""
    return (-0.5 * ((x - mean) / std).square() - torch.log(std) - 0.5 * LOG_2PI).sum(-1)


def gaussian_entropy(std: Tensor) -> Tensor:
    """Differential entropy ``sum_d 1/2 log(2 pi e s_d^2)`` of a diagonal Gaussian."""
    return (torch.log(std) + 0.5 * (LOG_2PI + 1.0)).sum(-1)


def gaussian_fuse(mean_a: Tensor, std_a: Tensor, mean_b: Tensor, std_b: Tensor) -> tuple[Tensor, Tensor]:
    """The normalised product of two diagonal Gaussians (the AV belief fusion): precisions add,
    ``mean = (s_b^2 m_a + s_a^2 m_b) / (s_a^2 + s_b^2)``, ``1/s^2 = 1/s_a^2 + 1/s_b^2``."""
    var_a, var_b = std_a.square(), std_b.square()
    mean = (var_b * mean_a + var_a * mean_b) / (var_a + var_b)
    return mean, torch.sqrt(var_a * var_b / (var_a + var_b))
