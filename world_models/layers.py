"""Network pieces shared by world models and agents: MLPs, initialisations, EMA targets, running statistics.

- :func:`mlp`: Linear -> ReLU stacks.
- :func:`weight_init` (orthogonal, DrQ-v2 / URLB) and :func:`xavier_init` (garage / METRA).
- :func:`soft_update_params`: Polyak averaging (EMA) of a target network.
- :class:`RunningMeanStd`: running mean / variance for normalisation (folds the global batch under
  data-parallel training).
- :func:`gather_batch` / :func:`local_rows`: the rows of every data-parallel rank's shard of an update
  batch, for terms that couple rows (``latentrl.training.distributed`` declares the group).
- Diagonal Gaussians: :func:`gaussian_kl`, :func:`gaussian_log_prob`, :func:`gaussian_entropy`,
  :func:`gaussian_fuse` (the product of two Gaussians), used by the active inference model and agent.
- :func:`make_adam`: every agent's Adam / AdamW, with the fastest exact implementation for the device.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["RunningMeanStd", "gaussian_entropy", "gaussian_fuse", "gaussian_kl", "gaussian_log_prob",
           "adam_implementation", "last_grad_norm", "make_adam", "mlp", "soft_update_params", "weight_init",
           "xavier_init",
           "data_parallel_group", "data_parallel_world_size", "gather_batch", "local_rows", "set_data_parallel_group"]

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


_ADAM_IMPLS = ("auto", "fused", "foreach", "loop")
_adam_impl = "auto"  # what make_adam(impl=None) builds; changed only inside adam_implementation(...)


@contextlib.contextmanager
def adam_implementation(impl: str) -> Iterator[None]:
    """Within the block, :func:`make_adam` builds ``impl`` ("auto", "fused", "foreach", "loop") unless told
    otherwise: agents built inside use it (the learner benchmark's "speed-ups off" rows, equivalence tests)."""
    global _adam_impl
    if impl not in _ADAM_IMPLS:
        raise ValueError(f"adam_implementation: impl must be one of {', '.join(_ADAM_IMPLS)}, got {impl!r}")
    previous, _adam_impl = _adam_impl, impl
    try:
        yield
    finally:
        _adam_impl = previous


def make_adam(params, lr: float, *, decoupled_weight_decay: bool = False, impl: str | None = None,
              max_grad_norm: float | None = None, **kwargs) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (or ``AdamW`` with ``decoupled_weight_decay=True``) over ``params``: every agent's
    optimizers are built here, so one setting picks the implementation of the same update rule for all.

    ``impl=None`` reads the default (``"auto"``, or what :func:`adam_implementation` set). ``"auto"`` is the
    fused implementation (the whole step in a few kernels) on CUDA, and ``foreach`` (one kernel per op over all
    parameters) elsewhere: on the CPU ``foreach`` gives bit-for-bit the per-parameter loop's parameters (PyTorch's
    CPU default), so golden files and seeded runs are unchanged. ``"fused"`` on the CPU is 4-8x faster per step
    for the agents' paper networks but rounds differently (about one ulp per step; tests/test_learner_speed.py
    bounds N updates within 1e-4), so it is an opt-in there (``learner.adam=fused``). ``"foreach"`` and
    ``"loop"`` (``foreach=False``) force those. ``kwargs`` go to the optimizer (``betas``, ``weight_decay``, ...).

    ``max_grad_norm``: clip the global L2 norm of the optimizer's gradients to it before each step
    (``clip_grad_norm_`` in a step pre-hook, so every ``step()`` clips without the agent's update saying so).
    Under torchrun :class:`~latentrl.training.distributed.GradientAverager` puts its averaging hook in front of
    this one, so the norm is that of the averaged (global-batch) gradient on every rank, as in one process.
    """
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"make_adam: max_grad_norm must be positive or None, got {max_grad_norm!r}")
    params = list(params)
    impl = _adam_impl if impl is None else impl
    if impl not in _ADAM_IMPLS:
        raise ValueError(f"make_adam: impl must be one of {', '.join(_ADAM_IMPLS)}, got {impl!r}")
    if impl == "auto":
        tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        cuda = bool(tensors) and all(p.device.type == "cuda" and p.is_floating_point() for p in tensors)
        impl = "fused" if cuda else "foreach"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    optimizer = cls(params, lr=lr, **flags, **kwargs)
    if max_grad_norm is not None:
        optimizer._latentrl_clip = clip = _GradNormClip(float(max_grad_norm))
        optimizer.register_step_pre_hook(clip)
    return optimizer


class _GradNormClip:
    """Step pre-hook: ``clip_grad_norm_`` over every parameter of the optimizer (see :func:`make_adam`). Keeps
    the norm before clipping of the last step in ``last_norm`` (read it with :func:`last_grad_norm`)."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm
        self.last_norm: Tensor | None = None

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # no host read: the clip coefficient stays a tensor (min(1, max_norm / norm) multiplies every gradient)
        self.last_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm).detach()


def last_grad_norm(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The global gradient norm, before clipping, of ``optimizer``'s last step when :func:`make_adam` clips it
    (``max_grad_norm``); ``None`` when it does not clip or has not stepped. A tensor: no host read."""
    clip = getattr(optimizer, "_latentrl_clip", None)
    return None if clip is None else clip.last_norm


def compile_networks(module: nn.Module, mode: str | None = None) -> list[str]:
    """``torch.compile`` the networks inside ``module`` in place and return their names.

    The networks are the outermost ``nn.Sequential`` stacks and pixel / state encoders (the conv trunks, MLPs and
    heads where an update spends its time); the glue between them (losses, EMA, sphere projections) stays eager.
    ``nn.Module.compile`` keeps the modules and their ``state_dict`` keys, so checkpoints and model files are
    unchanged. ``mode=None`` is ``"reduce-overhead"`` (CUDA graphs) when the parameters are on CUDA, else
    ``"default"``. Compiled code rounds differently from eager (fused kernels), so this is an opt-in
    (``learner.compile=true``); the first calls of each shape compile (tens of seconds on a CPU).
    """
    from latentrl.world_models.encoders import ENCODERS  # encoders import this module

    if mode is None:
        on_cuda = any(p.device.type == "cuda" for p in module.parameters())
        mode = "reduce-overhead" if on_cuda else "default"
    kinds = (nn.Sequential, *ENCODERS.values())
    names: list[str] = []

    def visit(prefix: str, sub: nn.Module) -> None:
        for name, child in sub.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, kinds) and any(True for _ in child.parameters()):
                child.compile(mode=mode)
                names.append(path)
            else:
                visit(f"{path}.", child)

    visit("", module)
    return names


# ---------------------------------------------------------------------- data-parallel update batches
# Under data-parallel training (latentrl.training.distributed) every rank's update sees its own shard of the
# global batch, b = B / world_size rows, and the optimizers average gradients. Terms that couple rows (an
# orthonormality loss over all pairs, goals drawn from other rows, batch statistics) must see the global
# batch to give the single-process update: they call gather_batch, which is the identity in one process.
_DATA_PARALLEL_GROUP: list = [None]  # [group]; None: a single process (the default)


def set_data_parallel_group(group) -> None:
    """Declare the ``torch.distributed`` process group whose ranks each hold one equal shard of every update
    batch (``latentrl.training.distributed.init_from_env`` does it; ``None`` turns it off). Explicit, so that a
    process group made for something else (e.g. TorchRL's distributed collectors) never changes an update."""
    _DATA_PARALLEL_GROUP[0] = group


def data_parallel_group():
    """The declared data-parallel group, or ``None`` in a single process (or a world of one)."""
    group = _DATA_PARALLEL_GROUP[0]
    if group is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) < 2:
        return None
    return group


def data_parallel_world_size() -> int:
    """Ranks of the declared data-parallel group (1 in a single process). A loss that *sums* over the batch's
    rows is multiplied by it on each rank, so that the optimizers' gradient averaging (a mean over ranks) gives
    the gradient of the sum over the global batch."""
    group = data_parallel_group()
    return 1 if group is None else torch.distributed.get_world_size(group)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the incoming gradient contiguous. ``all_gather``'s backward hands
    each rank's slice of the gradient to gloo's all-to-all, which reads strided memory wrongly: a gathered
    tensor used through a transposed view (FB's ``[E, B, d]`` maps) would send back garbage gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def gather_batch(x: Tensor, *, grad: bool = False) -> Tensor:
    """The rows of every rank's shard of ``x`` ``[b, *]``, in rank order: ``[world_size * b, *]`` (the global
    batch, as one process would hold it); ``x`` itself in a single process.

    ``grad=True`` keeps the autograd graph (``torch.distributed.nn.functional.all_gather``): its backward sums
    over ranks the gradients that reach each rank's own rows. A loss computed identically on every rank from
    the gathered rows thus gives each rank ``world_size`` times its rows' share of the gradient, and the
    optimizers' gradient averaging (a mean over ranks) turns the sum of those shares into the single-process
    gradient. Every rank must call it at the same point with the same shape (shards are equal by design).
    """
    group = data_parallel_group()
    if group is None:
        return x
    if grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated for a private successor; still the public autograd gather
            warnings.simplefilter("ignore", FutureWarning)
            return _ContiguousGrad.apply(torch.cat(all_gather(x.contiguous(), group=group)))
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts)


def local_rows(x: Tensor) -> Tensor:
    """This rank's rows of a global-batch tensor ``[world_size * b, *]`` (the inverse of :func:`gather_batch`);
    ``x`` itself in a single process."""
    group = data_parallel_group()
    if group is None:
        return x
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    if x.shape[0] % world:
        raise ValueError(f"a global batch of {x.shape[0]} rows does not split into {world} equal shards")
    return x.chunk(world)[rank]


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
    def update(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Fold in a batch ``[N, *shape]`` (N >= 2 for a variance; N = 1 updates the mean only). ``mask``
        ``[N]`` (bool) folds only the rows it marks, with fixed shapes (no host sync, and every data-parallel
        rank keeps its N rows); a mask without rows changes nothing.

        Under data-parallel training (in training mode) the batch is every rank's shard together
        (:func:`gather_batch`), so the statistics stay identical on all ranks and equal one process's."""
        x = x.detach().reshape(-1, *self.mean.shape).to(self.mean.dtype)
        if mask is not None:
            mask = mask.detach().reshape(-1).to(x.dtype)
        if self.training:
            x = gather_batch(x)
            mask = None if mask is None else gather_batch(mask)
        if mask is None:
            n = x.shape[0]
            if n == 0:
                return
            batch_mean = x.mean(dim=0)
            batch_var = x.var(dim=0) if n > 1 else torch.zeros_like(batch_mean)
        else:  # n is a tensor: with no row, new_share below is 0 and the statistics stay as they are
            w = mask.reshape(-1, *[1] * self.mean.dim())
            n = mask.sum().to(self.count.dtype)
            batch_mean = (x * w).sum(dim=0) / n.clamp_min(1).to(x.dtype)
            batch_var = ((x - batch_mean).square() * w).sum(dim=0) / (n - 1).clamp_min(1).to(x.dtype)
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
