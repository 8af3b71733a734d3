"""PV-RNN: the predictive-coding-inspired variational RNN (``shared/algorithms/pv_rnn.md``).

Ahmadi & Tani 2019 (PV-RNN), Matsumoto & Tani 2020 (GLean, eq. 1-12), Ohata & Tani 2020 (eq. 4-19).

- **Generative model** (spec §2, §11 reference loop): layers ``l = 0`` (bottom, fast) .. ``L - 1`` (top,
  slow) of leaky units ``h_t = (1 - 1/tau) h_{t-1} + (W_dd d_{t-1} + W_zd z_t + W_td d_t^{l+1} + b) / tau``,
  ``d_t = tanh(h_t)``, computed top-down so the layer above is already at time ``t`` (OT eq. 8);
  the output ``x_hat_t = W_out d_t^0`` (identity output, MSE: OT's choice; GLean's 10-bin softmax
  code is not used).
- **Prior**: ``N(0, I)`` at an episode's first step, the learned ``N(tanh(mu), exp(log_sigma))`` of
  ``W_p d_{t-1}`` afterwards.
- **Posterior**: variant A (GLean, pvrnn_sa), ``mu_q = tanh(A_mu)``, ``sigma_q = exp(A_log_sigma)``,
  given by *adaptive vectors* ``A`` ``[B, T, sum_l 2 z_l]`` passed in by the caller: there is no
  encoder. Training keeps one row of ``A`` per training segment (:class:`AdaptiveVectors`, held by
  the agent beside the replay buffer); error regression and planning optimise fresh ones.
- **Objective** (spec §3, the pvrnn_sa / OT convention ``+ w KL / z``, *not* GLean's ``2 w KL / z``):
  ``sum_t ||x_t - x_hat_t||^2 / x_dim + sum_l [w1_l KL_1^l + w_l sum_{t>=2} KL_t^l] / z_l``, summed over
  the batch rows (so rows never share a normaliser).
- **Error regression** (:meth:`PVRNNModel.infer`, spec §5): weights frozen, Adam on the window's
  adaptive vectors only; **GLean planning** (:meth:`PVRNNModel.plan`, spec §6): the same with the
  accuracy term on the start and goal steps only, K candidates in parallel, argmin kept.
- **Pixels**: a small convolutional autoencoder (:class:`ConvAutoencoder`) trained by the agent for
  its first ``autoencoder_updates`` updates and frozen afterwards; PV-RNN models its latent
  trajectory (OT's vision path, spec §4 and §11).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import read_key
from latentrl.world_models.layers import data_parallel_group, data_parallel_world_size, gather_batch

__all__ = ["AdaptiveVectors", "ConvAutoencoder", "PVRNNModel", "gaussian_kl_log_sigma"]

LOG_SIGMA_MIN, LOG_SIGMA_MAX = math.log(1e-5), math.log(5.0)  # EFE-GLean's sigma_min / sigma_max


def gaussian_kl_log_sigma(mu_q: Tensor, log_sigma_q: Tensor, mu_p: Tensor, log_sigma_p: Tensor) -> Tensor:
    """``KL(N(mu_q, sigma_q) || N(mu_p, sigma_p))`` per unit (OT eq. 6):
    ``log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2``."""
    var_ratio = torch.exp(2.0 * (log_sigma_q - log_sigma_p))
    return (log_sigma_p - log_sigma_q) + 0.5 * var_ratio + 0.5 * (mu_q - mu_p).square() * torch.exp(
        -2.0 * log_sigma_p) - 0.5


class ConvAutoencoder(nn.Module):
    """The pixel front end: ``[*, 3, 64, 64]`` uint8 -> latent ``[*, latent_dim]`` in (-1, 1) and back."""

    def __init__(self, image_size: int, latent_dim: int = 16, depth: int = 16):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"the PV-RNN pixel autoencoder needs an image size divisible by 8, got {image_size}")
        s = image_size // 8
        self.image_size, self.latent_dim = image_size, latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, depth, 4, 2, 1), nn.ReLU(), nn.Conv2d(depth, 2 * depth, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * depth, 2 * depth, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * depth * s * s, latent_dim),
            nn.Tanh())
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 2 * depth * s * s), nn.ReLU(), nn.Unflatten(1, (2 * depth, s, s)),
            nn.ConvTranspose2d(2 * depth, 2 * depth, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(2 * depth, depth, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(depth, 3, 4, 2, 1))

    def encode(self, pixels: Tensor) -> Tensor:
        lead = pixels.shape[:-3]
        x = pixels.reshape(-1, *pixels.shape[-3:]).float() / 255.0 - 0.5
        return self.encoder(x).reshape(*lead, self.latent_dim)

    def decode(self, latent: Tensor) -> Tensor:
        """Latent -> frames in [0, 1] ``[*, 3, H, W]`` (float)."""
        lead = latent.shape[:-1]
        out = self.decoder(latent.reshape(-1, self.latent_dim)) + 0.5
        return out.reshape(*lead, 3, self.image_size, self.image_size)

    def loss(self, pixels: Tensor) -> Tensor:
        target = pixels.reshape(-1, *pixels.shape[-3:]).float() / 255.0
        return (self.decode(self.encode(pixels)).reshape_as(target) - target).square().mean()


class PVRNNModel(WorldModel):
    """The PV-RNN generative model; see the module docstring.

    Args:
        obs_key: ``"state"`` or ``"pixels"``: the observation the model reads.
        obs_shape: one observation (``[P]`` or ``[3, H, W]``).
        d_sizes, z_sizes, taus, meta_prior, w1: per layer, bottom first (``d / z / tau``, the KL weight
            at ``t >= 2`` and at an episode's first step).
        model_dims: state indices the model predicts (``None``: all); pixels use the autoencoder latent.
        pixel_latent_dim: autoencoder latent size (pixels only).
        er_iters, er_lr: error-regression iterations and Adam rate of :meth:`observe` / :meth:`infer`.
        recon_weight: weight of the reconstruction term against the KL (training, error regression and
            planning alike). 1 is OT / pvrnn_sa's ``||x - x_hat||^2 / x_dim``. GLean's accuracy is the KL
            between 10-bin softmax codes (kernel sigma 0.005 on [0, 1]), about 15-26 x ``delta^2`` per dim
            for small errors, against a ``2 w KL / z`` prior term: the same meta-prior w means the same
            balance as GLean's only with ``recon_weight`` ~= 10 on data in [0, 1].
    """

    capabilities = frozenset({"sequence", "infer"})

    def __init__(self, obs_key: str, obs_shape: Sequence[int], *, d_sizes: Sequence[int], z_sizes: Sequence[int],
                 taus: Sequence[float], meta_prior: Sequence[float], w1: Sequence[float],
                 model_dims: Sequence[int] | None = None, pixel_latent_dim: int = 16, autoencoder_depth: int = 16,
                 er_iters: int = 10, er_lr: float = 0.09, recon_weight: float = 1.0):
        super().__init__()
        sizes = {len(d_sizes), len(z_sizes), len(taus), len(meta_prior), len(w1)}
        if len(sizes) != 1:
            raise ValueError("d_sizes, z_sizes, taus, meta_prior and w1 need one entry per layer; got lengths "
                             f"{[len(d_sizes), len(z_sizes), len(taus), len(meta_prior), len(w1)]}")
        if any(t < 1 for t in taus):
            raise ValueError(f"time constants tau must be >= 1, got {list(taus)}")
        self.obs_key, self.obs_shape = obs_key, tuple(int(s) for s in obs_shape)
        self.d_sizes, self.z_sizes = [int(d) for d in d_sizes], [int(z) for z in z_sizes]
        self.num_layers = len(self.d_sizes)
        self.register_buffer("taus", torch.tensor([float(t) for t in taus]))
        self.register_buffer("meta_prior", torch.tensor([float(w) for w in meta_prior]))
        self.register_buffer("w1", torch.tensor([float(w) for w in w1]))
        self.er_iters, self.er_lr = int(er_iters), float(er_lr)
        if recon_weight <= 0:
            raise ValueError(f"recon_weight must be > 0, got {recon_weight}")
        self.recon_weight = float(recon_weight)
        if obs_key == "pixels":
            self.autoencoder = ConvAutoencoder(self.obs_shape[-1], pixel_latent_dim, autoencoder_depth)
            self.register_buffer("model_dims", None)
            self.x_dim = pixel_latent_dim
        else:
            self.autoencoder = None
            dims = list(range(self.obs_shape[-1])) if model_dims is None else [int(i) for i in model_dims]
            if not dims or min(dims) < 0 or max(dims) >= self.obs_shape[-1]:
                raise ValueError(f"model_dims must index the {self.obs_shape[-1]} state dims, got {model_dims}")
            self.register_buffer("model_dims", torch.tensor(dims, dtype=torch.int64))
            self.x_dim = len(dims)
        self.recurrent = nn.ModuleList(nn.Linear(d, d) for d in self.d_sizes)  # W_dd and the bias b
        self.from_z = nn.ModuleList(nn.Linear(z, d, bias=False) for z, d in zip(self.z_sizes, self.d_sizes,
                                                                                  strict=True))
        self.top_down = nn.ModuleList(nn.Linear(self.d_sizes[layer + 1], self.d_sizes[layer], bias=False)
                                      for layer in range(self.num_layers - 1))
        self.prior = nn.ModuleList(nn.Linear(d, 2 * z) for d, z in zip(self.d_sizes, self.z_sizes, strict=True))
        self.output = nn.Linear(self.d_sizes[0], self.x_dim)
        offsets = [0]
        for z in self.z_sizes:
            offsets.append(offsets[-1] + 2 * z)
        self.offsets = offsets
        self.adaptive_dim = offsets[-1]
        """Size of one step's adaptive vector: ``sum_l 2 z_l`` (``[mu ‖ log_sigma]`` pre-activations per layer)."""

    # ----------------------------------------------------------------------------------- features
    def features(self, obs: TensorDict | Tensor) -> Tensor:
        """Observations ``[*, obs_shape]`` (or a TensorDict holding ``obs_key``) -> modelled vectors
        ``[*, x_dim]``: the chosen state dims, or the (frozen) autoencoder latent of a frame."""
        x = read_key(obs, self.obs_key, type(self).__name__) if isinstance(obs, TensorDict) else obs
        if self.autoencoder is not None:
            if x.shape[-3] != 3:
                raise ValueError(f"PV-RNN reads single frames [*, 3, H, W] (frame_stack 1), got {list(x.shape)}")
            with torch.no_grad():
                return self.autoencoder.encode(x)
        return x.float().index_select(-1, self.model_dims)

    # ------------------------------------------------------------------------------------ the core
    def zero_state(self, batch_size: int) -> dict[str, Tensor]:
        ref = self.output.weight
        out = {}
        for layer, d in enumerate(self.d_sizes):
            out[f"h{layer}"] = ref.new_zeros(batch_size, d)
            out[f"d{layer}"] = ref.new_zeros(batch_size, d)
        return out

    def prior_params(self, d_prev: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Learned prior ``(mu_p, log_sigma_p)`` of layer ``layer`` from its ``d_{t-1}``."""
        mu, log_sigma = self.prior[layer](d_prev).chunk(2, dim=-1)
        return torch.tanh(mu), log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def step(self, state: dict[str, Tensor], adaptive: Tensor | None, first: Tensor, *, sample: bool,
             eps: list[Tensor] | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor, list[Tensor]]:
        """One time step of every layer (top-down).

        ``adaptive`` ``[B, adaptive_dim]`` gives the posterior (``None``: z from the prior); ``first``
        ``[B]`` marks an episode's first step (unit-Gaussian prior). Returns the new state, ``x_hat``
        ``[B, x_dim]``, the per-layer KL ``[B, L]`` (each divided by ``z_l``; zeros without posterior)
        and the per-layer prior pre-activations ``[B, 2 z_l]`` (for initialising new adaptive slots).
        ``sample``: z = mu + sigma * eps (else the mean); ``eps`` fixes the noise per layer.
        """
        new: dict[str, Tensor] = {}
        kls, prior_pre = [], []
        first_col = first.reshape(-1, 1)
        d_above = None
        for layer in reversed(range(self.num_layers)):
            d_prev, h_prev = state[f"d{layer}"], state[f"h{layer}"]
            mu_p, log_sigma_p = self.prior_params(d_prev, layer)
            mu_p = torch.where(first_col, torch.zeros_like(mu_p), mu_p)
            log_sigma_p = torch.where(first_col, torch.zeros_like(log_sigma_p), log_sigma_p)
            prior_pre.append(torch.cat([torch.atanh(mu_p.clamp(-0.999, 0.999)), log_sigma_p], dim=-1))
            if adaptive is not None:
                a = adaptive[:, self.offsets[layer]:self.offsets[layer + 1]]
                a_mu, a_log_sigma = a.chunk(2, dim=-1)
                mu, log_sigma = torch.tanh(a_mu), a_log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
                kls.append(gaussian_kl_log_sigma(mu, log_sigma, mu_p, log_sigma_p).sum(-1) / self.z_sizes[layer])
            else:
                mu, log_sigma = mu_p, log_sigma_p
                kls.append(mu.new_zeros(mu.shape[0]))
            if sample:
                noise = torch.randn_like(mu) if eps is None else eps[layer]
                z = mu + torch.exp(log_sigma) * noise
            else:
                z = mu
            pre = self.recurrent[layer](d_prev) + self.from_z[layer](z)
            if d_above is not None:
                pre = pre + self.top_down[layer](d_above)
            inv_tau = 1.0 / self.taus[layer]
            h = (1.0 - inv_tau) * h_prev + inv_tau * pre
            d = torch.tanh(h)
            new[f"h{layer}"], new[f"d{layer}"] = h, d
            d_above = d
        kl = torch.stack(kls[::-1], dim=-1)
        return new, self.output(new["d0"]), kl, prior_pre[::-1]

    def rollout(self, state: dict[str, Tensor], adaptive: Tensor | None, first: Tensor, *, valid: Tensor | None = None,
                sample: bool = True, steps: int | None = None) -> dict[str, Tensor]:
        """Run ``T`` steps from ``state``: ``adaptive`` ``[B, T, adaptive_dim]`` (``None``: prior generation
        of ``steps`` steps), ``first`` ``[B, T]`` (episode-first steps), ``valid`` ``[B, T]`` (padded
        steps leave the state unchanged and count nothing). Returns ``x_hat`` ``[B, T, x_dim]``, ``kl``
        ``[B, T, L]``, ``prior_pre`` ``[B, T, adaptive_dim]``, ``d0`` ``[B, T, d_0]`` and the final ``state``."""
        t_len = adaptive.shape[1] if adaptive is not None else int(steps)
        x_hats, kls, pres, d0s = [], [], [], []
        for t in range(t_len):
            new, x_hat, kl, pre = self.step(state, None if adaptive is None else adaptive[:, t], first[:, t],
                                            sample=sample)
            if valid is not None:
                keep = valid[:, t].reshape(-1, 1)
                new = {k: torch.where(keep, v, state[k]) for k, v in new.items()}
                kl = kl * keep
            state = new
            x_hats.append(x_hat)
            kls.append(kl)
            pres.append(torch.cat(pre, dim=-1))
            d0s.append(new["d0"])
        return {"x_hat": torch.stack(x_hats, 1), "kl": torch.stack(kls, 1), "prior_pre": torch.stack(pres, 1),
                "d0": torch.stack(d0s, 1), "state": state}

    def free_energy(self, x: Tensor, out: dict[str, Tensor], first: Tensor, *, accuracy_mask: Tensor | None = None,
                    meta_prior: Tensor | None = None, w1: Tensor | None = None) -> dict[str, Tensor]:
        """Per-row terms ``[B]``: ``recon = recon_weight sum_t ||x - x_hat||^2 / x_dim`` over ``accuracy_mask``
        ``[B, T]`` or ``[B, T, x_dim]`` (default: every step), ``kl = sum_l sum_t w KL / z_l`` (``w1`` at
        first steps), and ``kl_layers`` ``[B, L]`` (unweighted, summed over t)."""
        w = self.meta_prior if meta_prior is None else meta_prior
        w_first = self.w1 if w1 is None else w1
        err = (x - out["x_hat"]).square()
        if accuracy_mask is not None:
            mask = accuracy_mask if accuracy_mask.dim() == 3 else accuracy_mask.unsqueeze(-1)
            err = err * mask
        recon = self.recon_weight * err.sum((1, 2)) / self.x_dim
        weights = torch.where(first.unsqueeze(-1), w_first, w)  # [B, T, L]
        kl = (out["kl"] * weights).sum((1, 2))
        return {"recon": recon, "kl": kl, "loss": recon + kl, "kl_layers": out["kl"].sum(1)}

    # ------------------------------------------------------------------------------------ training
    def loss(self, batch: TensorDict, adaptive: Tensor | None = None) -> TensorDict:
        """Negative ELBO of slices ``[B, T]`` (or transitions ``[B]``, as ``T = 1``), summed over rows.

        ``adaptive`` ``[B, T, adaptive_dim]`` are the rows of the training segments' adaptive vectors
        (the agent gathers them by ``segment_id`` / ``segment_step``); ``None`` uses fresh zeros (GLean's
        reset), so the loss still trains the weights. A slice that starts inside an episode restarts
        from zero state with the unit prior (truncated BPTT); full episodes (``horizon`` = episode
        length) are exact. Pixels: the autoencoder's loss is added as ``autoencoder`` (the agent stops
        it after ``autoencoder_updates``)."""
        if batch.batch_dims == 1:
            batch = batch.unsqueeze(1)
        x = self.features(batch)
        b, t_len = x.shape[:2]
        if adaptive is None:
            adaptive = x.new_zeros(b, t_len, self.adaptive_dim, requires_grad=True)
        first = torch.zeros(b, t_len, dtype=torch.bool, device=x.device)
        first[:, 0] = True
        out = self.rollout(self.zero_state(b), adaptive, first, sample=True)
        terms = self.free_energy(x, out, first)
        loss = terms["loss"].sum()
        result = {"loss": loss, "recon": terms["recon"].mean().detach(), "kl": terms["kl"].mean().detach(),
                  "rmse": (x - out["x_hat"]).square().mean().sqrt().detach()}
        for layer in range(self.num_layers):
            result[f"kl_layer{layer}"] = (terms["kl_layers"][:, layer] / t_len).mean().detach()
        return TensorDict(result, batch_size=[])

    # --------------------------------------------------------------------- the recurrent contract
    def initial_state(self, batch_size: int) -> TensorDict:
        """Zero ``h``, ``d`` per layer, ``steps`` 0 (the next step is an episode's first) and ``x_hat``."""
        state = self.zero_state(batch_size)
        state["steps"] = torch.zeros(batch_size, dtype=torch.int64, device=self.output.weight.device)
        state["x_hat"] = self.output.weight.new_zeros(batch_size, self.x_dim)
        return TensorDict(state, batch_size=[batch_size])

    def _core(self, state: TensorDict) -> dict[str, Tensor]:
        return {k: state[k] for layer in range(self.num_layers) for k in (f"h{layer}", f"d{layer}")}

    def observe(self, state: TensorDict, obs: TensorDict, prev_action: Tensor, is_first: Tensor) -> TensorDict:
        """Posterior belief after ``obs``: error regression on a one-step window (``er_iters`` Adam steps
        on that step's adaptive vector). Rows with ``is_first`` restart from :meth:`initial_state`."""
        del prev_action  # PV-RNN is purely generative (GLean: no external input)
        n = state.batch_size[0]
        is_first = torch.as_tensor(is_first, device=state.device).reshape(-1).bool()
        fresh = self.initial_state(n)
        state = TensorDict({k: torch.where(is_first.reshape(-1, *[1] * (v.dim() - 1)), fresh[k], v)
                            for k, v in state.items()}, batch_size=[n])
        window = TensorDict({"x": self.features(obs).unsqueeze(1)}, batch_size=[n, 1])
        out = self.infer(window, state, self.er_iters)
        return out.exclude("adaptive", "x_hat_window", "recon", "kl")

    def predict(self, state: TensorDict, action: Tensor | None = None) -> TensorDict:
        """One prior step, z sampled from ``p(z_t | d_{t-1})`` (N(0, I) at an episode's first step)."""
        del action
        first = state["steps"] == 0
        new, x_hat, _, _ = self.step(self._core(state), None, first, sample=True)
        return TensorDict({**new, "steps": state["steps"] + 1, "x_hat": x_hat}, batch_size=state.batch_size)

    def generate(self, batch_size: int, steps: int, *, sample: bool = True) -> Tensor:
        """Prior generation from scratch: ``[batch_size, steps, x_dim]`` (GLean ``test.py --prior_only``)."""
        first = torch.zeros(batch_size, steps, dtype=torch.bool, device=self.output.weight.device)
        first[:, 0] = True
        return self.rollout(self.zero_state(batch_size), None, first, sample=sample, steps=steps)["x_hat"]

    # ------------------------------------------------------------------------- error regression
    def infer(self, window: TensorDict, state: TensorDict, iters: int, *, lr: float | None = None,
              sample: bool = False, meta_prior: Tensor | None = None, history: bool = False) -> TensorDict:
        """Error regression over a window (spec §5): only the window's adaptive vectors move.

        ``window`` ``[B, W]`` holds ``x`` (modelled vectors; or the observation key), optionally
        ``adaptive`` (the starting vectors; default: the prior pre-activations, as pvrnn_sa; ``fresh``
        ``[B, W]`` marks slots of ``adaptive`` to reset to them), ``valid``
        (right-aligned padding at an episode's start) and ``first`` (episode-first steps; default:
        the window's first valid step when ``state["steps"] == 0``). ``state`` ``[B]`` is the belief at
        the window's start. Each of ``iters`` iterations runs the window with the posterior and takes
        an Adam step (``lr``, default ``er_lr``) on the summed free energy. Returns the belief after
        the window (``h``, ``d``, ``steps``, ``x_hat`` = the prior's prediction of the next step, its
        mean) plus ``adaptive`` ``[B, W, A]``, ``x_hat_window`` ``[B, W, x_dim]``, ``recon`` and
        ``kl`` ``[B]`` of the final iterate (and ``recon_history`` ``[B, iters + 1]`` with ``history``).
        """
        x = window["x"] if "x" in window.keys() else self.features(window)
        b, w_len = x.shape[:2]
        valid = window["valid"] if "valid" in window.keys() else torch.ones(b, w_len, dtype=torch.bool,
                                                                             device=x.device)
        if "first" in window.keys():
            first = window["first"]
        else:
            prev_valid = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
            first = valid & ~prev_valid & (state["steps"] == 0).reshape(-1, 1)
        start = {k: v.detach() for k, v in self._core(state).items()}
        lr = self.er_lr if lr is None else lr
        params = [p for p in self.parameters()]
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                if "adaptive" in window.keys():
                    init = window["adaptive"].detach().clone()
                    if "fresh" in window.keys():  # new slots start at the prior's pre-activation (pvrnn_sa)
                        with torch.no_grad():
                            pre = self.rollout(start, init, first, valid=valid, sample=False)["prior_pre"]
                        init = torch.where(window["fresh"].unsqueeze(-1), pre, init)
                else:
                    with torch.no_grad():
                        init = self._prior_init(start, first, valid, w_len)
                adaptive = init.requires_grad_(True)
                optimizer = torch.optim.Adam([adaptive], lr=lr, eps=lr / 10.0)
                recon_hist = []
                for _ in range(int(iters)):
                    out = self.rollout(start, adaptive, first, valid=valid, sample=sample)
                    terms = self.free_energy(x, out, first, accuracy_mask=valid, meta_prior=meta_prior)
                    recon_hist.append(terms["recon"].detach())
                    optimizer.zero_grad(set_to_none=True)
                    terms["loss"].sum().backward()
                    optimizer.step()
            with torch.no_grad():
                adaptive = adaptive.detach()
                out = self.rollout(start, adaptive, first, valid=valid, sample=False)
                terms = self.free_energy(x, out, first, accuracy_mask=valid, meta_prior=meta_prior)
                recon_hist.append(terms["recon"])
                end = out["state"]
                steps = state["steps"] + valid.sum(1)
                _, x_next, _, _ = self.step(end, None, steps == 0, sample=False)
        finally:
            for p, flag in zip(params, saved, strict=True):
                p.requires_grad_(flag)
        result = {**end, "steps": steps, "x_hat": x_next, "adaptive": adaptive, "x_hat_window": out["x_hat"],
                  "recon": terms["recon"], "kl": terms["kl"]}
        td = TensorDict({k: v for k, v in result.items() if k not in ("adaptive", "x_hat_window")}, batch_size=[b])
        td["adaptive"], td["x_hat_window"] = adaptive, out["x_hat"]
        if history:
            td["recon_history"] = torch.stack(recon_hist, dim=1)
        return td

    def _prior_init(self, start: dict[str, Tensor], first: Tensor, valid: Tensor, w_len: int) -> Tensor:
        """Adaptive vectors set to the prior pre-activations along a prior-mean rollout of the window."""
        state, pres = start, []
        for t in range(w_len):
            new, _, _, pre = self.step(state, None, first[:, t], sample=False)
            keep = valid[:, t].reshape(-1, 1)
            state = {k: torch.where(keep, v, state[k]) for k, v in new.items()}
            pres.append(torch.cat(pre, dim=-1))
        return torch.stack(pres, dim=1)

    # ---------------------------------------------------------------------------- GLean planning
    def plan(self, goal: Tensor, horizon: int, *, start: Tensor | None = None, goal_mask: Tensor | None = None,
             candidates: int = 8, iters: int = 500, lr: float = 0.05, generator: torch.Generator | None = None,
             meta_prior: Tensor | None = None, sample: bool = False, rec_weighting: float = 0.0) -> dict[str, Tensor]:
        """GLean planning (spec §6, GL eq. 12): for each goal ``[N, x_dim]`` optimise ``candidates``
        adaptive-vector sequences ``[horizon, A]`` from zero (plus a little noise so the candidates
        differ) with accuracy only on the goal at the last step (``goal_mask`` ``[x_dim]`` or
        ``[N, x_dim]`` hides dims) and, if given, on the start observation ``[N, x_dim]`` at step 1;
        keep the candidate with the lowest free energy. Returns ``x_hat`` ``[N, horizon, x_dim]`` (the
        plan), ``adaptive`` ``[N, horizon, A]``, ``loss`` / ``goal_error`` ``[N]``.

        ``sample``: GLean's protocol, where every forward pass samples ``z = mu + sigma eps`` (plan.py
        through ops.calculate_z_posterior): the iterations optimise the reparameterised free energy and
        the returned plan is one sample (else: posterior means throughout, the deterministic plan the
        agent tracks). ``rec_weighting``: GLean's ``planning_auto_weight`` (model.py; default 1 there):
        > 0 multiplies the accuracy by ``horizon * rec_weighting / (1 + [start given] + 1)``, as if
        every step were observed (0: no reweighting)."""
        n = goal.shape[0]
        k = int(candidates)
        device = self.output.weight.device
        mask = torch.zeros(n * k, horizon, self.x_dim, device=device)
        gm = torch.ones(self.x_dim, device=device) if goal_mask is None else goal_mask.to(device).float()
        mask[:, -1] = gm.expand(n, -1).repeat_interleave(k, 0) if gm.dim() == 2 else gm
        target = torch.zeros(n * k, horizon, self.x_dim, device=device)
        target[:, -1] = goal.to(device).float().repeat_interleave(k, 0)
        if start is not None:
            mask[:, 0] = 1.0
            target[:, 0] = start.to(device).float().repeat_interleave(k, 0)
        if rec_weighting > 0:  # GLean: error_weight = T * rec_weighting / (1 + init_depth + 1)
            mask = mask * (horizon * rec_weighting / (2.0 + (start is not None)))
        first = torch.zeros(n * k, horizon, dtype=torch.bool, device=device)
        first[:, 0] = True
        noise = torch.randn(n * k, horizon, self.adaptive_dim, generator=generator).to(device)
        init = noise * 0.1
        init[:k] = 0.0 if n == 1 else init[:k]  # candidate 0 of goal 0 starts at GLean's zero reset
        params = list(self.parameters())
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                adaptive = init.requires_grad_(True)
                optimizer = torch.optim.Adam([adaptive], lr=lr, eps=lr / 10.0)
                zero = self.zero_state(n * k)
                for _ in range(int(iters)):
                    out = self.rollout(zero, adaptive, first, sample=sample)
                    terms = self.free_energy(target, out, first, accuracy_mask=mask, meta_prior=meta_prior)
                    optimizer.zero_grad(set_to_none=True)
                    terms["loss"].sum().backward()
                    optimizer.step()
            with torch.no_grad():
                adaptive = adaptive.detach()
                out = self.rollout(zero, adaptive, first, sample=sample)
                terms = self.free_energy(target, out, first, accuracy_mask=mask, meta_prior=meta_prior)
        finally:
            for p, flag in zip(params, saved, strict=True):
                p.requires_grad_(flag)
        loss = terms["loss"].reshape(n, k)
        best = loss.argmin(dim=1)
        rows = torch.arange(n, device=device) * k + best
        goal_mask = (mask[:, -1] > 0).float()
        goal_err = ((out["x_hat"][:, -1] - target[:, -1]).square() * goal_mask).sum(-1) / goal_mask.sum(
            -1).clamp_min(1)
        return {"x_hat": out["x_hat"][rows], "adaptive": adaptive[rows], "loss": loss.gather(1, best[:, None])[:, 0],
                "goal_error": goal_err[rows], "kl_layers": terms["kl_layers"][rows]}


class AdaptiveVectors(nn.Module):
    """The posterior of the training data (spec §12, "adaptive-vector store"): one row of
    ``[max_steps, adaptive_dim]`` free parameters per training segment, keyed by the replay buffer's
    stable ``segment_id`` and indexed by ``segment_step``.

    ``values``, the row -> segment map ``segment_ids`` (-1: free) and the per-entry Adam moments are
    all fixed-size tensors of the agent's ``state_dict``, so a checkpoint reloads into a fresh agent.
    A new segment takes a free row; when none is free, the row of the oldest (smallest) segment id
    is recycled (its vectors and moments zeroed), the segments a FIFO replay buffer drops first.
    Updates are per entry (:meth:`adam_step`): only the (row, step) entries of the batch move, so
    rows of different segments never share a gradient or an optimiser moment.

    Data-parallel training (``latentrl.training.distributed``, in training mode): the store is the global
    batch's on every rank. :meth:`rows` assigns rows for every rank's segment ids (gathered in rank order, so
    the assignment and recycling are those of one process on the global batch), and :meth:`adam_step` steps
    every entry of the global batch with its gradient averaged over the ranks, as the optimizers average the
    weights'. The store stays identical on all ranks without any gradient averaging of ``values`` (it is in no
    optimizer). Segment ids must then name the same segment on every rank (offline: the dataset's episode ids).
    """

    def __init__(self, capacity: int, max_steps: int, dim: int):
        super().__init__()
        self.capacity, self.max_steps, self.dim = int(capacity), int(max_steps), int(dim)
        self.values = nn.Parameter(torch.zeros(self.capacity, self.max_steps, self.dim))
        self.register_buffer("segment_ids", torch.full((self.capacity,), -1, dtype=torch.int64))
        self.register_buffer("exp_avg", torch.zeros(self.capacity, self.max_steps, self.dim))
        self.register_buffer("exp_avg_sq", torch.zeros(self.capacity, self.max_steps, self.dim))
        self.register_buffer("updates", torch.zeros(self.capacity, self.max_steps, dtype=torch.int64))

    def _data_parallel(self) -> bool:
        return self.training and data_parallel_group() is not None

    def rows(self, segment_ids: Tensor, *, create: bool = True) -> Tensor:
        """Row index ``[B]`` of each segment id ``[B]``; new ids take free (or recycled) rows, smallest id
        first. ``create=False`` only looks up (a ``KeyError`` names an id without a row).

        Under data-parallel training (``create`` in training mode) this is a collective: the rows are
        assigned for the global batch's ids and this rank's rows are returned."""
        local = segment_ids.reshape(-1).to(self.segment_ids.device)
        ids = gather_batch(local) if create and self._data_parallel() else local
        # The key -> row map is an allocation whose size depends on the data (how many ids are new, which rows
        # are free): it is decided on the host, with one sync per update (two when a batch brings new ids).
        unique = torch.unique(ids)
        new = unique[~torch.isin(unique, self.segment_ids)].tolist()
        if new and not create:
            raise KeyError(f"segment {new[0]} has no adaptive vectors (it was not trained on)")
        if new:
            free = (self.segment_ids < 0).nonzero().flatten()[:len(new)]
            if len(free) < len(new):  # recycle the oldest segments' rows, never a row of this batch
                held = self.segment_ids.clone()
                held[torch.isin(held, ids) | (held < 0)] = torch.iinfo(torch.int64).max
                oldest = held.argsort()[:len(new) - len(free)]
                if len(oldest) < len(new) - len(free) or bool((held[oldest] == torch.iinfo(torch.int64).max).any()):
                    raise ValueError(f"a batch holds more than {self.capacity} segments; raise the agent's "
                                     "num_sequences")
                free = torch.cat([free, oldest])
            self.segment_ids[free] = torch.tensor(new, dtype=torch.int64, device=free.device)
            with torch.no_grad():
                self.values[free] = 0.0
            self.exp_avg[free] = 0.0
            self.exp_avg_sq[free] = 0.0
            self.updates[free] = 0
        match = self.segment_ids.unsqueeze(0) == local.unsqueeze(1)  # [B, capacity]
        return match.float().argmax(dim=1)

    def gather(self, rows: Tensor, steps: Tensor) -> Tensor:
        """``values[rows, steps]`` ``[B, T, dim]`` with gradients into ``values``."""
        if int(steps.max()) >= self.max_steps:
            raise ValueError(f"segment_step {int(steps.max())} is beyond the {self.max_steps} steps kept per "
                             "segment; raise the agent's max_steps")
        return self.values[rows.reshape(-1, 1), steps]

    @torch.no_grad()
    def adam_step(self, rows: Tensor, steps: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8) -> None:
        """Adam on the entries ``(rows, steps)`` only (with per-entry bias correction), from ``values.grad``.

        Under data-parallel training (in training mode) this is a collective: every rank's entries and their
        gradients are gathered, an entry's gradient is the sum of the ranks' divided by the world size (the
        weights' averaging: a loss summed over rows is scaled by the world size on each rank, see
        ``world_models.layers.data_parallel_world_size``), and every rank steps every entry of the global batch."""
        grad = self.values.grad
        if grad is None:
            return
        r = rows.reshape(-1, 1).expand_as(steps).reshape(-1)
        s = steps.reshape(-1)
        flat = r * self.max_steps + s
        if self._data_parallel():
            # ``grad[entry]`` holds the entry's gradient summed over this rank's rows: send each entry once
            g = grad[r, s] * _first_occurrence(flat).unsqueeze(-1).to(grad.dtype)
            flat, g = gather_batch(flat), gather_batch(g)
            grad = torch.zeros_like(grad)
            grad.view(-1, self.dim).index_add_(0, flat, g).div_(data_parallel_world_size())
        flat = torch.unique(flat)
        r, s = flat // self.max_steps, flat % self.max_steps
        g = grad[r, s]
        self.updates[r, s] += 1
        count = self.updates[r, s].float().unsqueeze(-1)
        m = self.exp_avg[r, s].mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v = self.exp_avg_sq[r, s].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        self.exp_avg[r, s], self.exp_avg_sq[r, s] = m, v
        m_hat = m / (1 - betas[0] ** count)
        v_hat = v / (1 - betas[1] ** count)
        self.values[r, s] -= lr * m_hat / (v_hat.sqrt() + eps)
        self.values.grad = None


def _first_occurrence(keys: Tensor) -> Tensor:
    """Bool ``[N]``: whether each of ``keys`` ``[N]`` is the first of its value (fixed shape, no host sync)."""
    ordered, order = keys.sort(stable=True)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return torch.empty_like(first).scatter_(0, order, first)
