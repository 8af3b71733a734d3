"""StaMo's diffusion autoencoder at CPU scale (``shared/algorithms/stamo.md`` §2-3, §6).

- **Encoder** ``E(o) -> tokens [B, 2, D]`` (plus a pooled vector): a patch stem gives ``P`` patch
  features ``[B, P, D]`` (64 for a 64x64 frame), ``encoder_blocks`` transformer blocks mix them, and
  the reference's transposed attention compresses them to 2 tokens (:class:`TransposedCompressor`: the
  sequence is the D channels, their feature the map over the patches, shrunk 64 -> 32 -> 16 -> 8 -> 4
  -> 2; ``compression="queries"``: the spec's learned-query variant, which loses where things are).
  ``pooled = Linear(mean over tokens)`` (the reference's ``DiTConditionHead``). E reads **one frame**:
  no time, no action, no other frame.
- **Patch stem: trained jointly (the spec's option (b)).** The reference freezes a pretrained
  DINOv2; no pretrained weights can be downloaded here, so :class:`ConvPatchStem` (conv 3 -> 32 ->
  64 -> 128, stride 2 each) is trained with the rest. This is a deviation: E is then no longer
  "frozen features + compressor". The stem is a plain ``nn.Module`` ``pixels uint8 [B, 3, H, W] ->
  [B, P, D]`` with a ``num_patches`` attribute, passed as ``stem=``: a frozen pretrained extractor (e.g.
  DINOv2 ViT-S/14 patch features projected to D, with ``requires_grad_(False)``) drops in without other
  changes.
- **Decoder** ``D(z_sigma, sigma, tokens) -> velocity``: a pixel-space DiT (patch 8 -> 64 tokens x
  ``decoder_dim``) whose blocks are self-attention, **cross-attention to the tokens** and an MLP, each
  modulated by AdaLN-zero on ``time embedding + Linear(pooled)`` (SD3's ``encoder_hidden_states`` and
  ``pooled_projections``). The decoder sees the observation only through the tokens. By default the
  transformer predicts ``x0`` and the velocity is formed from it (:class:`StaMoDecoder`, ``prediction``).
- **Objective** (eq. 1, the reference's ``train_step``): rectified flow, ``z_sigma = (1 - sigma) x0 +
  sigma eps`` (:func:`flow_interpolant`), target ``eps - x0`` (:func:`flow_target`), ``sigma =
  shift_sigma(sigmoid(N(0, 1)), sigma_shift)`` (logit-normal read through SD3's shifted scheduler sigmas,
  ``sigma_shift = 3``; weight 1), loss ``mean (v_hat - target)^2``. Nothing else trains
  the model: no action, temporal or reconstruction-in-latent loss.
- **Sampler**: Euler from ``sigma = 1`` (pure noise) to ``0`` in ``sample_steps`` steps on the same
  shifted grid (:func:`euler_sample`).

Observations: ``pixels`` uint8 ``[B, 3, H, W]`` (scaled to [-1, 1] for both E and D) or ``state``
``[B, S]``; for states the stem is an MLP to ``state_patches`` tokens and the decoder denoises the
state vector as one token (the conformance suite's state runs; StaMo itself is a pixel method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import read_key

__all__ = ["COMPRESSIONS", "ConvPatchStem", "QueryCompressor", "StaMoDecoder", "StaMoEncoder", "StaMoModel",
           "StatePatchStem", "TransposedCompressor", "euler_sample", "flow_interpolant", "flow_target",
           "logit_normal_sigma", "shift_sigma", "transposed_stage_sizes"]


# ---------------------------------------------------------------------------------- rectified flow


def flow_interpolant(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """``z_sigma = (1 - sigma) x0 + sigma eps`` (``sigma`` ``[B]``, broadcast over the other dims)."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * eps


def flow_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The velocity the decoder regresses: ``d z_sigma / d sigma = eps - x0``."""
    return eps - x0


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift ``shift * s / (1 + (shift - 1) * s)``: a monotone map of [0, 1] onto itself that
    keeps 0 and 1 and moves the mass towards noise for ``shift > 1`` (``FlowMatchEulerDiscreteScheduler``
    applies it to its training and sampling sigmas; SD3-medium's scheduler config has ``shift = 3.0``)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def logit_normal_sigma(n: int, *, device=None, generator: torch.Generator | None = None,
                       shift: float = 1.0) -> Tensor:
    """``sigma = shift_sigma(sigmoid(u), shift)``, ``u ~ N(0, 1)`` ``[n]`` (SD3's ``logit_normal`` density,
    mean 0, std 1, read through the scheduler's shifted sigmas; ``shift = 1``: the plain logit-normal)."""
    return shift_sigma(torch.sigmoid(torch.randn(n, generator=generator).to(device)), shift)


def euler_sample(velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int,
                 shift: float = 1.0) -> Tensor:
    """Integrate ``dz/dsigma = velocity(z, sigma)`` from ``z = noise`` at ``sigma = 1`` to ``sigma = 0`` in
    ``steps`` Euler steps on the grid ``shift_sigma(linspace(1, 0, steps + 1), shift)`` (equal steps for
    ``shift = 1``); returns ``z`` at ``sigma = 0`` (the sample)."""
    if steps < 1:
        raise ValueError(f"euler_sample needs steps >= 1, got {steps}")
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, device=noise.device), shift)
    z = noise
    for i in range(steps):
        sigma = sigmas[i].expand(noise.shape[0])
        z = z + (sigmas[i + 1] - sigmas[i]) * velocity(z, sigma)
    return z


# ------------------------------------------------------------------------------------------ blocks


def _timestep_embedding(sigma: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of ``scale * sigma`` (SD3 embeds ``t = 1000 sigma``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = scale * sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Attention(nn.Module):
    """Multi-head attention of ``x`` ``[B, N, D]`` over ``context`` ``[B, M, Dc]`` (itself when ``None``);
    ``inner`` is the width of the heads together (``dim`` unless given: the transposed compressor's
    features are a few wide, its heads are not)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, inner: int | None = None):
        super().__init__()
        inner = int(inner or dim)
        if inner % heads:
            raise ValueError(f"attention width {inner} is not divisible by {heads} heads")
        self.heads, self.inner = heads, inner
        self.q = nn.Linear(dim, inner)
        self.kv = nn.Linear(context_dim or dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        context = x if context is None else context
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, self.inner))


class _Block(nn.Module):
    """Pre-norm transformer block: self-attention (or cross-attention to ``context``) and an MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(context_dim or dim) if cross else None
        self.attn = _Attention(dim, heads, context_dim if cross else None)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.cross:
            x = x + self.attn(self.norm1(x), self.norm_ctx(context))
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvPatchStem(nn.Module):
    """Pixels uint8 ``[B, 3, H, W]`` -> patch features ``[B, (H/8)(W/8), dim]``: conv 3 -> 32 -> 64 -> ``dim``,
    stride 2 each (the spec's CPU stem), plus learned position embeddings. Trained jointly with the
    compressor (option (b)); replace it with a frozen pretrained extractor of the same signature."""

    def __init__(self, obs_shape: Sequence[int], dim: int = 128, channels: Sequence[int] = (32, 64)):
        super().__init__()
        c, h, w = (int(s) for s in obs_shape)
        if h % 8 or w % 8:
            raise ValueError(f"ConvPatchStem needs frames whose sides divide by 8, got {h}x{w}")
        chans = [c, *channels, dim]
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1)]
            if i < 2:
                layers += [nn.GELU()]
        self.net = nn.Sequential(*layers)
        self.num_patches = (h // 8) * (w // 8)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, dim) * 0.02)

    def forward(self, pixels: Tensor) -> Tensor:
        x = pixels.float() / 127.5 - 1.0
        return self.net(x).flatten(2).transpose(1, 2) + self.pos


class StatePatchStem(nn.Module):
    """A state vector ``[B, S]`` -> ``patches`` pseudo-patch tokens ``[B, patches, dim]`` by an MLP."""

    def __init__(self, state_dim: int, dim: int = 128, patches: int = 8):
        super().__init__()
        self.num_patches, self.dim = int(patches), int(dim)
        self.net = nn.Sequential(nn.Linear(state_dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, patches * dim))

    def forward(self, state: Tensor) -> Tensor:
        return self.net(state.float()).reshape(state.shape[0], self.num_patches, self.dim)


class _ChannelBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` as the reference's projector uses it: self-attention, cross-attention
    to ``context`` and an MLP, each pre-normed and residual, with heads ``heads x head_dim`` wide whatever
    the (small) feature size ``dim``."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, heads, inner=heads * head_dim)
        self.cross_attn = _Attention(dim, heads, context_dim, inner=heads * head_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


def transposed_stage_sizes(num_patches: int, num_tokens: int, stages: int = 6) -> list[int]:
    """The reference's ``2 ** ceil(linspace(floor(log2 P), log2 N, stages))`` with the last size ``N`` itself:
    ``[64, 32, 16, 8, 4, 2]`` for 64 patches and 2 tokens (``[256, 128, 64, 16, 8, 2]`` at 224 px)."""
    if num_patches < num_tokens:
        raise ValueError(f"cannot compress {num_patches} patches to {num_tokens} tokens")
    ends = torch.linspace(math.floor(math.log2(num_patches)), math.log2(num_tokens), stages).tolist()
    return [2 ** math.ceil(v - 1e-9) for v in ends[:-1]] + [int(num_tokens)]


class TransposedCompressor(nn.Module):
    """The reference's compression (``projector.py``; spec §2 "transposed attention"): patch features
    ``[B, P, D]`` -> ``q [B, P, D]`` and ``kv [B, P, Dkv]``; ``q`` is transposed to ``[B, D, P]`` so the
    sequence is the ``D`` channels and each channel's feature is its map over the patches; ``Linear(P -> d0)``
    mixes the patch positions, then stages of (block over the channels, cross-attending to ``kv``;
    ``Linear(d_i -> d_{i+1})``) shrink the feature to ``num_tokens``; the result ``[B, D, N]`` is transposed
    to tokens ``[B, N, D]``.

    The first map is linear in the patch positions, so where a feature fires survives compression. The
    learned-query variant (:class:`QueryCompressor`) pools patches by content-based attention, and in our
    measurement its tokens lost the reacher arm. Trained on the joint angles directly, that encoder stayed
    at held-out R^2 ~0 after 400 updates, while its patch stem, flattened, reached 0.70; see
    docs/bench_stamo.md."""

    def __init__(self, num_patches: int, dim: int, num_tokens: int, *, heads: int = 4, head_dim: int = 16,
                 kv_dim: int | None = None, stages: int = 6):
        super().__init__()
        self.dim, self.kv_dim = int(dim), int(kv_dim or dim // 2)
        self.sizes = transposed_stage_sizes(num_patches, num_tokens, stages)
        self.qkv = nn.Linear(dim, self.dim + self.kv_dim)
        self.align = nn.Linear(num_patches, self.sizes[0])
        # the reference zips 5 down-projections with 6 blocks, so its last block (feature size 2) never runs
        self.blocks = nn.ModuleList(_ChannelBlock(d, heads, head_dim, self.kv_dim) for d in self.sizes[:-1])
        self.downs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True))

    def forward(self, h: Tensor) -> Tensor:
        q, kv = self.qkv(h).split([self.dim, self.kv_dim], dim=-1)
        x = self.align(q.transpose(1, 2))  # [B, D, d0]: every channel's map over the patches, linearly mixed
        for block, down in zip(self.blocks, self.downs, strict=True):
            x = down(block(x, kv))
        return x.transpose(1, 2)  # [B, N, D]


class QueryCompressor(nn.Module):
    """Compression by learned queries (the spec's allowed variant): stage ``i`` has ``counts[i]`` queries that
    cross-attend to the previous stage's tokens (the patch features first); the last has ``num_tokens``."""

    def __init__(self, dim: int, num_tokens: int, *, heads: int = 4, counts: Sequence[int] = (16, 4)):
        super().__init__()
        counts = [*counts, num_tokens]
        self.queries = nn.ParameterList(nn.Parameter(torch.randn(1, n, dim) * 0.02) for n in counts)
        self.blocks = nn.ModuleList(_Block(dim, heads, dim, cross=True) for _ in counts)

    def forward(self, h: Tensor) -> Tensor:
        for queries, block in zip(self.queries, self.blocks, strict=True):
            h = block(queries.expand(h.shape[0], -1, -1), h)
        return h


COMPRESSIONS = ("transposed", "queries")


class StaMoEncoder(nn.Module):
    """``E``: one observation -> tokens ``[B, num_tokens, dim]``; see the module docstring.

    ``compression``: ``"transposed"`` (the reference's, :class:`TransposedCompressor`; needs the stem's
    ``num_patches``) or ``"queries"`` (:class:`QueryCompressor` with ``compress`` query counts)."""

    def __init__(self, stem: nn.Module, dim: int = 128, *, blocks: int = 2, heads: int = 4,
                 compression: str = "transposed", compress: Sequence[int] = (16, 4), num_tokens: int = 2,
                 pooled_dim: int = 256):
        super().__init__()
        if compression not in COMPRESSIONS:
            raise ValueError(f"StaMoEncoder compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.stem, self.dim, self.num_tokens = stem, int(dim), int(num_tokens)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(blocks))
        if compression == "transposed":
            self.compressor = TransposedCompressor(int(stem.num_patches), dim, num_tokens, heads=heads)
        else:
            self.compressor = QueryCompressor(dim, num_tokens, heads=heads, counts=compress)
        self.norm = nn.LayerNorm(dim)
        self.pooled_head = nn.Linear(dim, pooled_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Observation ``[B, ...]`` -> tokens ``[B, num_tokens, dim]``."""
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.norm(self.compressor(h))

    def pooled(self, tokens: Tensor) -> Tensor:
        """The pooled vector ``[B, pooled_dim]`` = ``Linear(mean over tokens)`` (affine in the tokens)."""
        return self.pooled_head(tokens.mean(dim=1))


class _DiTBlock(nn.Module):
    """A DiT block: AdaLN-zero-modulated self-attention, cross-attention to the tokens, MLP."""

    def __init__(self, dim: int, heads: int, token_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = _Attention(dim, heads)
        self.cross_attn = _Attention(dim, heads, token_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 9 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, cond: Tensor, tokens: Tensor) -> Tensor:
        mods = self.ada(F.silu(cond)).unsqueeze(1).chunk(9, dim=-1)
        (s1, c1, g1), (s2, c2, g2), (s3, c3, g3) = mods[:3], mods[3:6], mods[6:]
        x = x + g1 * self.self_attn(self.norm1(x) * (1 + c1) + s1)
        x = x + g2 * self.cross_attn(self.norm2(x) * (1 + c2) + s2, tokens)
        return x + g3 * self.mlp(self.norm3(x) * (1 + c3) + s3)


class StaMoDecoder(nn.Module):
    """``D(z_sigma, sigma, tokens, pooled) -> velocity`` with the shape of ``z_sigma``.

    ``prediction="x"`` (default): the transformer outputs ``x0_hat`` and the velocity is ``(z - x0_hat) /
    max(sigma, min_sigma)`` (JiT, Li & He 2025: a pixel patch of 8x8x3 = 192 values does not fit through a
    128-wide token, so predicting the noise-like velocity directly stalls; the loss is still the velocity MSE
    against ``eps - x0``). ``"v"``: the transformer outputs the velocity (the reference's SD3 in latent space).

    Pixels ``[B, 3, H, W]`` are cut into ``patch x patch`` patches (``(H/p)(W/p)`` DiT tokens); a state
    ``[B, S]`` is one DiT token."""

    def __init__(self, obs_shape: Sequence[int], token_dim: int, pooled_dim: int, *, dim: int = 128,
                 blocks: int = 4, heads: int = 4, patch: int = 8, prediction: str = "x", min_sigma: float = 0.05):
        super().__init__()
        if prediction not in ("x", "v"):
            raise ValueError(f"prediction must be 'x' or 'v', got {prediction!r}")
        self.prediction, self.min_sigma = prediction, float(min_sigma)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.pixels = len(self.obs_shape) == 3
        self.dim, self.patch = int(dim), int(patch)
        if self.pixels:
            c, h, w = self.obs_shape
            if h % patch or w % patch:
                raise ValueError(f"decoder patch {patch} does not divide the frame {h}x{w}")
            self.grid = (h // patch, w // patch)
            patch_dim = c * patch * patch
            seq = self.grid[0] * self.grid[1]
        else:
            patch_dim, seq = self.obs_shape[0], 1
        self.patch_in = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.pooled_proj = nn.Linear(pooled_dim, dim)
        self.token_norm = nn.LayerNorm(token_dim)
        self.blocks = nn.ModuleList(_DiTBlock(dim, heads, token_dim) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.patch_out = nn.Linear(dim, patch_dim)
        for layer in (self.ada_out, self.patch_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _patchify(self, x: Tensor) -> Tensor:
        if not self.pixels:
            return x.unsqueeze(1)
        b, c, _, _ = x.shape
        p, (gh, gw) = self.patch, self.grid
        return x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)

    def _unpatchify(self, x: Tensor) -> Tensor:
        if not self.pixels:
            return x.squeeze(1)
        b = x.shape[0]
        c, p, (gh, gw) = self.obs_shape[0], self.patch, self.grid
        return x.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, *self.obs_shape)

    def forward(self, z: Tensor, sigma: Tensor, tokens: Tensor, pooled: Tensor) -> Tensor:
        h = self.patch_in(self._patchify(z)) + self.pos
        cond = self.time_mlp(_timestep_embedding(sigma, self.dim)) + self.pooled_proj(pooled)
        ctx = self.token_norm(tokens)
        for block in self.blocks:
            h = block(h, cond, ctx)
        shift, scale = self.ada_out(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        out = self._unpatchify(self.patch_out(self.norm_out(h) * (1 + scale) + shift))
        if self.prediction == "v":
            return out
        # x-prediction: the network outputs x0_hat and the velocity is (z - x0_hat) / sigma, sigma clamped
        s = sigma.reshape(-1, *([1] * (z.dim() - 1))).to(z.dtype).clamp_min(self.min_sigma)
        return (z - out) / s


# ------------------------------------------------------------------------------------------- model


class StaMoModel(WorldModel):
    """StaMo's diffusion autoencoder: ``encode`` (tokens ``[B, 2, D]``), ``decode`` (flow sampler), ``loss``.

    ``stem`` replaces the jointly trained patch stem (pixels: :class:`ConvPatchStem`; states:
    :class:`StatePatchStem`) by any module ``obs [B, ...] -> [B, P, token_dim]``, e.g. a frozen
    pretrained ViT's projected patch features.
    """

    capabilities = frozenset({"encode", "decode"})

    def __init__(self, obs_key: str, obs_shape: Sequence[int], *, token_dim: int = 128, num_tokens: int = 2,
                 stem_channels: Sequence[int] = (32, 64), encoder_blocks: int = 2, heads: int = 4,
                 compression: str = "transposed", compress: Sequence[int] = (16, 4), pooled_dim: int = 256,
                 state_patches: int = 8,
                 decoder_dim: int = 128, decoder_blocks: int = 4, patch: int = 8, sample_steps: int = 20,
                 prediction: str = "x", sigma_shift: float = 3.0, stem: nn.Module | None = None):
        super().__init__()
        if obs_key not in ("pixels", "state"):
            raise ValueError(f"StaMoModel reads 'pixels' or 'state', got {obs_key!r}")
        self.obs_key, self.obs_shape = obs_key, tuple(int(s) for s in obs_shape)
        self.token_dim, self.num_tokens, self.sample_steps = int(token_dim), int(num_tokens), int(sample_steps)
        if not sigma_shift > 0:
            raise ValueError(f"StaMoModel.sigma_shift must be > 0, got {sigma_shift}")
        self.sigma_shift = float(sigma_shift)
        if stem is None:
            stem = (ConvPatchStem(self.obs_shape, token_dim, stem_channels) if obs_key == "pixels"
                    else StatePatchStem(self.obs_shape[0], token_dim, state_patches))
        self.encoder = StaMoEncoder(stem, token_dim, blocks=encoder_blocks, heads=heads, compression=compression,
                                    compress=compress, num_tokens=num_tokens, pooled_dim=pooled_dim)
        self.decoder = StaMoDecoder(self.obs_shape, token_dim, pooled_dim, dim=decoder_dim, blocks=decoder_blocks,
                                    heads=heads, patch=patch, prediction=prediction)

    @property
    def device(self) -> torch.device:
        return self.encoder.pooled_head.weight.device

    # ------------------------------------------------------------------------------------ scaling
    def to_model_space(self, x: Tensor) -> Tensor:
        """What the flow models: pixels ``uint8 -> [-1, 1]`` floats, states as floats."""
        return x.float() / 127.5 - 1.0 if self.obs_key == "pixels" else x.float()

    def from_model_space(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`to_model_space`: pixels as floats in [0, 255] (clamped), states as they are."""
        return ((x + 1.0) * 127.5).clamp(0.0, 255.0) if self.obs_key == "pixels" else x

    def _read(self, obs: TensorDict | Tensor) -> Tensor:
        x = obs if isinstance(obs, Tensor) else read_key(obs, self.obs_key, type(self).__name__)
        want = 3 if self.obs_key == "pixels" else 1
        if tuple(x.shape[-want:]) != self.obs_shape:
            raise ValueError(f"StaMoModel encodes one {self.obs_key} observation of shape {list(self.obs_shape)} "
                             f"(a single frame, no stack), got {list(x.shape)}")
        return x.reshape(-1, *self.obs_shape).to(self.device)

    # ------------------------------------------------------------------------------ the contract
    def encode(self, obs: TensorDict | Tensor) -> Tensor:
        """One observation per row -> tokens ``[B, num_tokens, token_dim]`` (E has no time or action input)."""
        return self.encoder(self._read(obs))

    def pooled(self, tokens: Tensor) -> Tensor:
        """The pooled vector ``[B, pooled_dim]`` of tokens (an affine map of their mean)."""
        return self.encoder.pooled(tokens)

    def velocity(self, z: Tensor, sigma: Tensor, tokens: Tensor) -> Tensor:
        """The decoder's velocity ``v_hat(z_sigma, sigma | tokens)`` in model space."""
        return self.decoder(z, sigma, tokens, self.pooled(tokens))

    @torch.no_grad()
    def decode(self, latent: Tensor, steps: int | None = None, noise: Tensor | None = None,
               generator: torch.Generator | None = None) -> TensorDict:
        """Tokens ``[B, N, D]`` -> ``{obs_key: sample}`` by the Euler sampler (``steps``, default
        ``sample_steps``) from ``noise`` (default: standard normal, from ``generator``). Pixels come back as
        floats in [0, 255]."""
        tokens = latent.to(self.device)
        if noise is None:
            noise = torch.randn((tokens.shape[0], *self.obs_shape), generator=generator).to(self.device)
        x0 = euler_sample(lambda z, s: self.velocity(z, s, tokens), noise, int(steps or self.sample_steps),
                          self.sigma_shift)
        out = self.from_model_space(x0)
        return TensorDict({self.obs_key: out}, batch_size=[out.shape[0]])

    # -------------------------------------------------------------------------------------- loss
    def frames(self, batch: TensorDict) -> Tensor:
        """The single frames a batch trains on: ``[B]`` transitions give ``o_t`` (and a fixed-offset batch
        also ``o_{t+k}``); ``[B, L]`` slices give one frame per slice, uniform over ``o_t .. o_{t+L}``."""
        key = self.obs_key
        x = read_key(batch, key, type(self).__name__)
        if batch.batch_dims == 2:
            seq = torch.cat([x, batch["next", key][:, -1:]], dim=1)  # [B, L + 1, ...]
            pick = torch.randint(seq.shape[1], (seq.shape[0],))
            x = seq[torch.arange(seq.shape[0]), pick]
        elif batch.batch_dims == 1 and ("target", key) in batch.keys(True):
            x = torch.cat([x, batch["target", key]])
        elif batch.batch_dims != 1:
            raise ValueError(f"StaMoModel.loss takes transitions [B] or slices [B, L], got {list(batch.batch_size)}")
        if key == "pixels" and x.shape[-3] != self.obs_shape[0]:
            x = x[..., -self.obs_shape[0]:, :, :]  # a frame stack: StaMo reads single frames (the newest)
        return x.to(self.device)

    def flow_loss(self, x: Tensor, eps: Tensor | None = None, sigma: Tensor | None = None) -> TensorDict:
        """Rectified-flow loss of frames ``x`` ``[B, *obs_shape]`` (raw: uint8 pixels or states):
        ``mean (D(z_sigma, sigma, E(x)) - (eps - x0))^2`` with ``z_sigma = (1 - sigma) x0 + sigma eps``,
        ``sigma`` logit-normal through the shift; ``eps`` and ``sigma`` may be given (tests)."""
        tokens = self.encoder(x)
        x0 = self.to_model_space(x)
        eps = torch.randn_like(x0) if eps is None else eps
        if sigma is None:
            sigma = logit_normal_sigma(x0.shape[0], device=x0.device, shift=self.sigma_shift)
        z = flow_interpolant(x0, eps, sigma)
        v_hat = self.decoder(z, sigma, tokens, self.pooled(tokens))
        loss = (v_hat - flow_target(x0, eps)).square().mean()
        return TensorDict({"loss": loss, "flow_mse": loss.detach(), "sigma_mean": sigma.mean().detach(),
                           "token_norm": tokens.detach().norm(dim=-1).mean()}, batch_size=[])

    def loss(self, batch: TensorDict) -> TensorDict:
        """The rectified-flow loss (:meth:`flow_loss`) on the batch's single frames (:meth:`frames`)."""
        return self.flow_loss(self.frames(batch))
