"""Network pieces shared by world models and agents: MLPs, initialisations, EMA targets, running statistics.

- :func:`mlp`: Linear -> ReLU stacks.
- :func:`weight_init` (orthogonal, DrQ-v2 / URLB) and :func:`xavier_init` (garage / METRA).
- :func:`soft_update_params`: Polyak averaging (EMA) of a target network.
- :class:`RunningMeanStd`: running mean / variance for normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RunningMeanStd", "mlp", "soft_update_params", "weight_init", "xavier_init"]


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
