"""Independent forward passes: every network of METRA, TD-JEPA, FB and RND against a functional
transcription of the authors' architecture.

``tests/test_reference_updates.py`` checks each agent's *update* against a transcription of the authors'
update, but that transcription runs the agent's own modules for the forward passes, so a bug inside a
network (a dropped activation or LayerNorm, a wrong conv stride, the skill concatenated in the wrong
place, the ``tanh`` or the log-std clamp of the policy changed, the pixel scaling changed) passes it. Here
each network's forward is recomputed from its weights alone: the layers are written out with
``F.conv2d`` / ``F.linear`` / ``F.layer_norm`` and the activations, as the authors' code builds them, and
the module's output must agree within 1e-5 on random pixels and states, at the agents' ``smoke`` configs.

The weights are read from the module's ``state_dict()`` under a name prefix, in registration order
(:class:`_Weights`): each transcribed layer takes the next weight of the expected kind and shape, so a layer
missing from the module (a LayerNorm left out) or one too many fails here by name, and a missing activation
fails on the numbers. All parameters are perturbed first, so that zero biases and unit LayerNorm gains
(their initial values) take part.

Architectures transcribed (the authors' code, read for the facts; ``shared/algorithms/{metra,td_jepa}.md``):

- METRA (``seohongpark/METRA`` ``tests/main.py``, ``garagei/torch/modules/with_encoder.py``, garage's
  ``GaussianMLPTwoHeadedModule`` / ``TanhNormal``): per network its own DreamerV2 CNN (``x / 255``,
  4 x Conv(k4, s2, no padding) with depths ``d * (1, 2, 4, 8)``, ELU, flatten in ``[C, H, W]`` order), the
  non-pixel inputs concatenated after it; ``phi`` a ReLU MLP (its mean head; DIAYN adds a ReLU log-std MLP
  on the same encoder); the policy a tanh MLP on ``enc(s) || z`` with a mean head and a log-std head, the
  log-std clamped to ``[log 1e-6, 2]`` (garage's ``min_std`` default, METRA's ``max_std = e^2``), a
  ``TanhNormal``; each Q a ReLU MLP on ``enc(s) || z || a``.
- TD-JEPA and FB (``facebookresearch/td_jepa`` ``metamotivo/nn_models.py``, ``normalizers.py``): the DrQ-v2
  trunk (``x / 255 - 0.5``, Conv(k3, s2) then 3 x Conv(k3, s1), ReLU, flatten) with the projection
  Linear-LayerNorm-Tanh; ``BackwardMap`` heads (Linear, or Linear-LN-Tanh, Linear-ReLU..., Linear) then
  ``Norm`` (``sqrt(d) x / |x|``); ``ForwardMap`` (``embed_z(obs || z)``, ``embed_sa(obs || a)``, each
  Linear-LN-Tanh ... Linear-ReLU to ``hidden / 2``, then ``Fs([sa || z])``, one set of weights per ensemble
  member); the ``simple`` actor (``policy([embed_s(obs) || embed_z(obs || z)])``, ``tanh`` mean, fixed std).
- RND (URLB ``agent/rnd.py``, ``agent/ddpg.py``): the DrQ-v2 encoder without projection; predictor and
  target Linear-ReLU-Linear-ReLU-Linear on the normalised input clipped to [-5, 5]; the DDPG actor (trunk
  Linear-LN-Tanh, ReLU MLP, ``tanh`` mean) and twin critic (pixels: ``[trunk(h) || a]``; states:
  ``trunk(h || a)``).

Where ours differs from the authors' on purpose, the transcription follows ours and says so: pixels arrive
channel-first ``[B, 3k, H, W]`` (METRA's code reshapes a flat HWC vector), METRA's state normaliser and
RND's input normaliser are running mean / std with the ``eps`` of agents/metra.py and world_models/rnd.py.
Not covered: LSD's spectrally normalised ``phi`` (its weights are ``weight_orig`` plus power-iteration
vectors, a different parametrisation), and layer widths (read from the weights: a wrong width is a
construction bug, and the shapes must still chain for the transcription to run).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.agents.fb import FBAgent
from latentrl.agents.metra import METRAAgent
from latentrl.agents.rnd import RNDAgent
from latentrl.agents.td_jepa import TDJEPAAgent

ATOL = 1e-5
ACTION_DIM = 3
STATE_DIM = 5
IMAGE = 64
BATCH = 6
OBS_TYPES = ("pixels", "state")


# ------------------------------------------------------------------------------------------- helpers


class _Weights:
    """The layers of one network, read from ``module.state_dict()`` under ``prefix`` in registration order.

    Each transcribed layer (:meth:`linear`, :meth:`layer_norm`, :meth:`conv`) takes the next ``(weight, bias)``
    and checks its kind and shape, so a layer missing from the module, or an extra one, fails with the
    layer's name; :meth:`done` checks that every layer was used. An ensemble Linear has weight
    ``[E, in, out]`` (inputs ``[E, B, in]``), an ensemble LayerNorm ``[E, 1, D]``.
    """

    def __init__(self, module: nn.Module, prefix: str = ""):
        layers: dict[str, dict[str, Tensor]] = {}
        for key, value in module.state_dict().items():
            if key.startswith(prefix):
                name, _, kind = key[len(prefix):].rpartition(".")
                if kind in ("weight", "bias"):
                    layers.setdefault(name, {})[kind] = value
        if not layers:
            raise AssertionError(f"{type(module).__name__} has no layers under {prefix!r}")
        self.prefix, self.queue = prefix, list(layers.items())

    def _next(self, kind: str, fits) -> tuple[Tensor, Tensor]:
        assert self.queue, f"{self.prefix}: the authors' architecture has a {kind} here; the module has no more layers"
        name, params = self.queue.pop(0)
        weight, bias = params["weight"], params.get("bias")
        assert bias is not None, f"{self.prefix}{name}: a {kind} with a bias expected, the module's has none"
        assert fits(weight), f"{self.prefix}{name}: a {kind} expected here, found a weight {tuple(weight.shape)}"
        return weight, bias

    def linear(self, x: Tensor) -> Tensor:
        """``x W^T + b`` (``[B, in]``), or per member ``x[e] W[e] + b[e]`` (``[E, B, in]``)."""
        if x.dim() == 3:
            w, b = self._next("ensemble Linear", lambda w: w.dim() == 3 and w.shape[:2] == (x.shape[0], x.shape[2]))
            return torch.einsum("ebi,eio->ebo", x, w) + b
        w, b = self._next("Linear", lambda w: w.dim() == 2 and w.shape[1] == x.shape[-1])
        return F.linear(x, w, b)

    def layer_norm(self, x: Tensor, eps: float = 1e-5) -> Tensor:
        d = x.shape[-1]
        w, b = self._next("LayerNorm", lambda w: w.shape[-1] == d and (w.dim() == 1 or w.shape[-2] == 1))
        return F.layer_norm(x, (d,), eps=eps) * w + b

    def conv(self, x: Tensor, kernel: int, stride: int, padding: int = 0) -> Tensor:
        w, b = self._next(f"Conv(k{kernel})", lambda w: w.dim() == 4 and w.shape[1:] == (x.shape[1], kernel, kernel))
        return F.conv2d(x, w, b, stride=stride, padding=padding)

    def done(self) -> None:
        assert not self.queue, f"{self.prefix}: layers the authors' architecture lacks: {[n for n, _ in self.queue]}"


def _mlp(w: _Weights, x: Tensor, hidden_layers: int, act) -> Tensor:
    """``hidden_layers`` x (Linear -> ``act``), then a Linear."""
    for _ in range(hidden_layers):
        x = act(w.linear(x))
    return w.linear(x)


def _sphere(x: Tensor) -> Tensor:
    """The reference ``Norm``: ``sqrt(d) x / |x|``."""
    return math.sqrt(x.shape[-1]) * x / x.norm(dim=-1, keepdim=True)


def _dreamer_cnn(w: _Weights, pixels: Tensor, num_layers: int = 4) -> Tensor:
    """METRA's encoder: ``x / 255``, then Conv(k4, s2, no padding) -> ELU per layer, flattened ``[C, H, W]``."""
    x = pixels.float() / 255.0
    for _ in range(num_layers):
        x = F.elu(w.conv(x, kernel=4, stride=2))
    return x.reshape(x.shape[0], -1)


def _drq_conv(w: _Weights, pixels: Tensor, num_layers: int = 4) -> Tensor:
    """The DrQ-v2 conv net: ``x / 255 - 0.5``, Conv(k3, s2) -> ReLU, then Conv(k3, s1) -> ReLU, flattened."""
    x = pixels.float() / 255.0 - 0.5
    for i in range(num_layers):
        x = F.relu(w.conv(x, kernel=3, stride=2 if i == 0 else 1))
    return x.reshape(x.shape[0], -1)


def _linear_ln_tanh(w: _Weights, x: Tensor) -> Tensor:
    """The DrQ-v2 / URLB trunk and the first layer of the reference embeddings: Linear -> LayerNorm -> Tanh."""
    return torch.tanh(w.layer_norm(w.linear(x)))


def _embedding(w: _Weights, x: Tensor, layers: int) -> Tensor:
    """The reference ``simple_embedding``: Linear-LN-Tanh, ``layers - 2`` x Linear-ReLU, then a Linear-ReLU
    (to ``hidden / 2``): ``layers - 1`` Linear-ReLU in all."""
    x = _linear_ln_tanh(w, x)
    for _ in range(layers - 1):
        x = F.relu(w.linear(x))
    return x


def _backward_map(w: _Weights, x: Tensor, hidden_layers: int) -> Tensor:
    """The reference ``BackwardMap`` with ``norm``: Linear (no hidden layer), or Linear-LN-Tanh,
    ``hidden_layers - 1`` x Linear-ReLU and a Linear; then ``Norm``."""
    if hidden_layers > 0:
        x = _linear_ln_tanh(w, x)
        for _ in range(hidden_layers - 1):
            x = F.relu(w.linear(x))
    return _sphere(w.linear(x))


def _forward_map(module: nn.Module, obs: Tensor, action: Tensor, z: Tensor, *, embedding_layers: int,
                 hidden_layers: int, ensemble: int) -> Tensor:
    """The reference ``ForwardMap``: ``Fs([embed_sa(obs || a) || embed_z(obs || z)])`` per member -> ``[E, B, out]``."""
    obs, action, z = (t.expand(ensemble, *t.shape) for t in (obs, action, z))
    embed_z, embed_sa, fs = (_Weights(module, p) for p in ("embed_z.", "embed_sa.", "head."))
    z_embedding = _embedding(embed_z, torch.cat([obs, z], dim=-1), embedding_layers)
    sa_embedding = _embedding(embed_sa, torch.cat([obs, action], dim=-1), embedding_layers)
    out = _mlp(fs, torch.cat([sa_embedding, z_embedding], dim=-1), hidden_layers, F.relu)
    for w in (embed_z, embed_sa, fs):
        w.done()
    return out


def _simple_actor_mean(module: nn.Module, obs: Tensor, z: Tensor, *, embedding_layers: int,
                       hidden_layers: int) -> Tensor:
    """The reference ``simple`` actor's mean: ``tanh(policy([embed_s(obs) || embed_z(obs || z)]))``."""
    embed_z, embed_s, policy = (_Weights(module, p) for p in ("embed_z.", "embed_s.", "policy."))
    z_embedding = _embedding(embed_z, torch.cat([obs, z], dim=-1), embedding_layers)
    s_embedding = _embedding(embed_s, obs, embedding_layers)
    mu = torch.tanh(_mlp(policy, torch.cat([s_embedding, z_embedding], dim=-1), hidden_layers, F.relu))
    for w in (embed_z, embed_s, policy):
        w.done()
    return mu


def _build(cls, obs_type: str, seed: int = 0, **overrides):
    """An agent at its ``smoke`` config with every parameter perturbed (biases and LayerNorm gains included)."""
    torch.manual_seed(seed)
    config = cls.make_config("smoke", obs_type=obs_type, **overrides)
    agent = cls(config, (3, IMAGE, IMAGE) if obs_type == "pixels" else (STATE_DIM,), ACTION_DIM)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return agent


def _inputs(obs_type: str, seed: int = 7, frames: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``(obs, action, noise)``: uint8 stacked frames ``[B, 3k, H, W]`` or states ``[B, D]``,
    actions in [-1, 1] ``[B, A]``, standard normals ``[B, 16]`` for latents and skills."""
    g = torch.Generator().manual_seed(seed)
    if obs_type == "pixels":
        obs = torch.randint(0, 256, (BATCH, 3 * frames, IMAGE, IMAGE), dtype=torch.uint8, generator=g)
    else:
        obs = torch.randn(BATCH, STATE_DIM, generator=g)
    return obs, torch.rand(BATCH, ACTION_DIM, generator=g) * 2 - 1, torch.randn(BATCH, 16, generator=g)


def _close(ours: Tensor, reference: Tensor, what: str) -> None:
    """``ours == reference`` within ``ATOL`` (relative where ``|reference| > 1``)."""
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)}, the reference's {tuple(reference.shape)}"
    err = ((ours - reference).abs() / reference.abs().clamp_min(1.0)).max().item()
    assert err <= ATOL, f"{what}: the module's forward differs from the authors' architecture by {err:.3g}"


# --------------------------------------------------------------------------------------------- METRA


def _metra_encoder(module: nn.Module, x: Tensor, pixels: bool) -> Tensor:
    """Each METRA network's own encoder: the DreamerV2 CNN for pixels, nothing for states."""
    if not pixels:
        return x.float()
    w = _Weights(module, "encoder.")
    h = _dreamer_cnn(w, x)
    w.done()
    return h


@pytest.mark.parametrize("obs_type", OBS_TYPES)
@pytest.mark.parametrize("objective", ["metra", "diayn"])
def test_metra_phi(obs_type, objective):
    """``phi`` (the official ``traj_encoder``): encoder, then a ReLU MLP to ``R^D``; DIAYN's log-std head is a
    second ReLU MLP on the same encoder output. State inputs go through the fixed normaliser first
    (ours: statistics from warm-up batches, ``(x - mean) / sqrt(var + 1e-8)``, where the official state runs
    use a preset mean / std)."""
    agent = _build(METRAAgent, obs_type, objective=objective, obs_normalizer_warmup=1)
    wm, layers = agent.world_model, agent.config.num_hidden_layers
    x, _, _ = _inputs(obs_type)
    pixels = obs_type == "pixels"
    if not pixels:
        rms = wm.normalizer.rms
        with torch.no_grad():
            rms.mean.copy_(torch.randn(STATE_DIM))
            rms.var.copy_(torch.rand(STATE_DIM) + 0.5)
        x_in = (x - rms.mean) / torch.sqrt(rms.var + 1e-8)
    else:
        x_in = x
    h = _metra_encoder(wm, x_in, pixels)
    head = _Weights(wm, "head.")
    phi = _mlp(head, h, layers, F.relu)
    head.done()
    with torch.no_grad():
        _close(wm.phi(x), phi, "METRA phi(s)")
        _close(wm.encode(TensorDict({obs_type: x.unsqueeze(1)}, batch_size=[BATCH, 1])), phi.unsqueeze(1),
               "METRA encode(obs) over a [B, 1] batch")
        mean, log_std = wm.skill_posterior(x)
        _close(mean, phi, "METRA skill posterior mean")
        if objective == "diayn":
            std_head = _Weights(wm, "log_std_head.")
            _close(log_std, _mlp(std_head, h, layers, F.relu), "DIAYN log-std head")
            std_head.done()
        else:
            assert log_std is None


@pytest.mark.parametrize("obs_type", OBS_TYPES)
def test_metra_policy(obs_type):
    """``pi(a | s, z)``: encoder, then garage's two-headed tanh MLP on ``enc(s) || z``; the log-std clamped to
    ``[log 1e-6, log e^2]``; a TanhNormal (mean ``tanh(mu)``, log-density with ``log(1 - a^2 + 1e-6)``)."""
    agent = _build(METRAAgent, obs_type)
    actor, layers, dim = agent.actor, agent.config.num_hidden_layers, agent.config.dim_option
    with torch.no_grad():  # log-stds below, inside and above the clamp
        actor.head.log_std_head.bias.copy_(torch.tensor([-40.0, 0.3, 40.0]))
    x, action, noise = _inputs(obs_type)
    z = F.normalize(noise[:, :dim], dim=-1)
    h = torch.cat([_metra_encoder(actor, x, obs_type == "pixels"), z], dim=-1)
    trunk = _Weights(actor, "head.trunk.")
    for _ in range(layers):
        h = torch.tanh(trunk.linear(h))
    trunk.done()
    mu = _Weights(actor, "head.mean_head.").linear(h)
    log_std = _Weights(actor, "head.log_std_head.").linear(h).clamp(math.log(1e-6), 2.0)
    std = log_std.exp()
    with torch.no_grad():
        dist = actor(x, z)
        _close(dist.normal.loc, mu, "METRA policy pre-tanh mean")
        _close(dist.stddev, std, "METRA policy std (clamped log-std)")
        _close(dist.mean, torch.tanh(mu), "METRA policy deterministic action tanh(mu)")
        torch.manual_seed(3)
        pre_tanh, sample = dist.rsample_with_pre_tanh()
        torch.manual_seed(3)
        u = mu + std * torch.randn(mu.shape)
        _close(pre_tanh, u, "METRA policy reparameterised sample (pre-tanh)")
        _close(sample, torch.tanh(u), "METRA policy sample")
        # garage's TanhNormal: log N(u; mu, std) - log(1 - tanh(u)^2 + 1e-6), summed over action dims
        normal_log_prob = -0.5 * ((u - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
        log_prob = (normal_log_prob - torch.log(1.0 - torch.tanh(u) ** 2 + 1e-6)).sum(-1)
        _close(dist.log_prob(sample, pre_tanh=pre_tanh), log_prob, "METRA policy TanhNormal log-prob")


@pytest.mark.parametrize("obs_type", OBS_TYPES)
def test_metra_critics(obs_type):
    """Each Q (and its target copy): its own encoder, then a ReLU MLP on ``enc(s) || z || a`` -> ``[B]``."""
    agent = _build(METRAAgent, obs_type)
    layers, dim = agent.config.num_hidden_layers, agent.config.dim_option
    x, action, noise = _inputs(obs_type)
    z = F.normalize(noise[:, :dim], dim=-1)
    for name in ("critic1", "critic2", "critic1_target", "critic2_target"):
        critic = getattr(agent, name)
        head = _Weights(critic, "head.")
        q = _mlp(head, torch.cat([_metra_encoder(critic, x, obs_type == "pixels"), z, action], dim=-1), layers, F.relu)
        head.done()
        with torch.no_grad():
            _close(critic(x, z, action), q.squeeze(-1), f"METRA {name}")


# ------------------------------------------------------------------------------------- TD-JEPA and FB


def _trunk(encoder: nn.Module, x: Tensor, pixels: bool) -> Tensor:
    """A zero-shot encoder's trunk: DrQ-v2 conv net + Linear-LN-Tanh projection (pixels), nothing (states)."""
    if not pixels:
        return x.float()
    conv, proj = _Weights(encoder, "trunk.convnet."), _Weights(encoder, "trunk.proj.")
    h = _linear_ln_tanh(proj, _drq_conv(conv, x))
    conv.done()
    proj.done()
    return h


def _latent_encoder(encoder: nn.Module, x: Tensor, pixels: bool, hidden_layers: int) -> tuple[Tensor, Tensor]:
    """``(trunk features, BackwardMap head(trunk features))`` of one zero-shot encoder."""
    h = _trunk(encoder, x, pixels)
    head = _Weights(encoder, "head.")
    out = _backward_map(head, h, hidden_layers)
    head.done()
    return h, out


def _check_zero_shot(agent, obs_type: str, name: str, *, encoders: dict[str, tuple[str, str, int]],
                     predictors: dict[str, tuple[str, str]], predictor_layers: tuple[int, int]) -> None:
    """Check a TD-JEPA / FB agent's encoders, predictors (and their EMA targets) and actor.

    ``encoders``: ``{model attribute: (model method, target head name, head hidden layers)}``, the state
    encoder (the actor's input) first; ``predictors``: ``{model attribute: (encoder whose latent it reads,
    target name)}``; ``predictor_layers``: ``(embedding layers, hidden layers)`` of the ForwardMaps.
    """
    cfg, wm = agent.config, agent.world_model
    pixels = obs_type == "pixels"
    x, action, noise = _inputs(obs_type)
    z = _sphere(noise[:, : wm.z_dim])
    embedding_layers, hidden_layers = predictor_layers
    latents = {}
    with torch.no_grad():
        for attr, (method, target_name, head_layers) in encoders.items():
            h, latents[attr] = _latent_encoder(getattr(wm, attr), x, pixels, head_layers)
            _close(getattr(wm, method)(TensorDict({obs_type: x}, batch_size=[BATCH])), latents[attr], f"{name} {attr}")
            target, w = wm.targets[target_name], _Weights(wm.targets[target_name])
            _close(target(h), _backward_map(w, h, head_layers), f"{name} target {target_name}")
            w.done()
        for attr, (latent_attr, target_name) in predictors.items():
            latent = latents[latent_attr]
            for module, what in ((getattr(wm, attr), attr), (wm.targets[target_name], f"target {target_name}")):
                ref = _forward_map(module, latent, action, z, embedding_layers=embedding_layers,
                                   hidden_layers=hidden_layers, ensemble=cfg.ensemble_size)
                _close(module(latent, action, z), ref, f"{name} {what}")
        state_latent = latents[next(iter(encoders))]
        mu = _simple_actor_mean(agent.actor, state_latent, z, embedding_layers=cfg.actor_embedding_layers,
                                hidden_layers=cfg.actor_hidden_layers)
        dist = agent.actor(state_latent, z, cfg.actor_std)
        _close(dist.mean, mu, f"{name} actor mean")
        _close(dist.stddev, torch.full_like(mu, cfg.actor_std), f"{name} actor std")


@pytest.mark.parametrize("obs_type", OBS_TYPES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_td_jepa_networks(obs_type, symmetric):
    """TD-JEPA (§2 of algorithms/td_jepa.md): ``phi`` and ``psi`` (trunk + BackwardMap head + Norm), ``T_phi``
    (on ``phi``) and ``T_psi`` (on ``psi``) as ensemble ForwardMaps, the EMA copies of the heads and
    predictors, and the ``simple`` actor on ``phi``. The symmetric variant has one encoder (``psi``'s
    architecture, serving as both) and ``T_phi`` alone."""
    agent = _build(TDJEPAAgent, obs_type, symmetric=symmetric)
    cfg = agent.config
    layers = (cfg.predictor_embedding_layers, cfg.predictor_hidden_layers)
    if symmetric:
        for method in ("encode", "encode_task"):
            _check_zero_shot(agent, obs_type, "symmetric TD-JEPA",
                             encoders={"phi_encoder": (method, "phi_head", cfg.psi_hidden_layers)},
                             predictors={"phi_predictor": ("phi_encoder", "phi_predictor")}, predictor_layers=layers)
        return
    _check_zero_shot(
        agent, obs_type, "TD-JEPA",
        encoders={"phi_encoder": ("encode", "phi_head", cfg.phi_hidden_layers),
                  "psi_encoder": ("encode_task", "psi_head", cfg.psi_hidden_layers)},
        predictors={"phi_predictor": ("phi_encoder", "phi_predictor"),
                    "psi_predictor": ("psi_encoder", "psi_predictor")},
        predictor_layers=layers,
    )


@pytest.mark.parametrize("obs_type", OBS_TYPES)
def test_fb_networks(obs_type):
    """FB (§7): ``L`` (``fw`` trunk + Linear + Norm) and ``B`` (``bw`` trunk + BackwardMap head + Norm), the
    forward map ``F(L(s), a, z)``, the EMA copies of the heads and ``F``, and the ``simple`` actor on ``L``."""
    agent = _build(FBAgent, obs_type)
    cfg = agent.config
    _check_zero_shot(
        agent, obs_type, "FB",
        encoders={"left_encoder": ("encode", "left_head", cfg.left_hidden_layers),
                  "backward_map": ("encode_task", "backward_head", cfg.backward_hidden_layers)},
        predictors={"forward_map": ("left_encoder", "forward_map")},
        predictor_layers=(cfg.forward_embedding_layers, cfg.forward_hidden_layers),
    )


# ----------------------------------------------------------------------------------------------- RND


@pytest.mark.parametrize("obs_type", OBS_TYPES)
def test_rnd_networks(obs_type):
    """RND (URLB): the DrQ-v2 encoder (pixels), predictor and frozen target MLPs on the normalised, clipped
    features and their error, and the DDPG actor and twin critic on the features."""
    agent = _build(RNDAgent, obs_type)
    cfg, wm, rnd = agent.config, agent.world_model, agent.rnd
    pixels = obs_type == "pixels"
    x, action, _ = _inputs(obs_type)
    if pixels:
        w = _Weights(wm, "encoder.")
        h = _drq_conv(w, x)
        w.done()
    else:
        h = x
    with torch.no_grad():
        _close(wm.encode(TensorDict({obs_type: x}, batch_size=[BATCH])), h, "RND encoder")

        # URLB normalises with BatchNorm1d(affine=False) (eps 1e-5) and clips to [-5, 5]; ours keeps running
        # statistics instead (agents/rnd.py), applied with the same formula.
        dim = h.shape[-1]
        rnd.obs_rms.mean.copy_(0.1 * torch.randn(dim))
        rnd.obs_rms.var.copy_(torch.rand(dim) * 0.05 + 0.01)  # small: some inputs reach the clip
        n = ((h - rnd.obs_rms.mean) / torch.sqrt(rnd.obs_rms.var + 1e-5)).clamp(-cfg.rnd_obs_clip, cfg.rnd_obs_clip)
        outputs = {}
        for part in ("predictor", "target"):
            w = _Weights(rnd, f"{part}.")
            outputs[part] = _mlp(w, n, 2, F.relu)
            w.done()
            _close(getattr(rnd, part)(n), outputs[part], f"RND {part}")
        error = (outputs["predictor"] - outputs["target"]).square().mean(-1, keepdim=True)
        _close(wm.prediction_error(h), error, "RND prediction error")

        # DDPG: pixels use a trunk to feature_dim and 2 hidden layers with the action after the critic's
        # trunk; states a trunk to hidden_dim and 1 hidden layer with the action inside the critic's trunk.
        layers = 2 if pixels else 1
        actor, critic = agent.actor_critic.actor, agent.actor_critic.critic
        trunk, policy = _Weights(actor, "trunk."), _Weights(actor, "policy.")
        mu = torch.tanh(_mlp(policy, _linear_ln_tanh(trunk, h), layers, F.relu))
        trunk.done()
        policy.done()
        dist = actor(h, 0.2)
        _close(dist.mean, mu, "RND DDPG actor mean")
        _close(dist.stddev, torch.full_like(mu, 0.2), "RND DDPG actor std")
        for module, what in ((critic, "critic"), (agent.actor_critic.critic_target, "target critic")):
            trunk = _Weights(module, "trunk.")
            if pixels:
                feature = torch.cat([_linear_ln_tanh(trunk, h), action], dim=-1)
            else:
                feature = _linear_ln_tanh(trunk, torch.cat([h, action], dim=-1))
            trunk.done()
            q1, q2 = module(h, action)
            for head, q in (("q1", q1), ("q2", q2)):
                w = _Weights(module, f"{head}.")
                _close(q, _mlp(w, feature, layers, F.relu), f"RND {what} {head}")
                w.done()
