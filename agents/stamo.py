"""StaMo: latent actions as differences of compact state tokens (``shared/algorithms/stamo.md``; the model:
:mod:`latentrl.world_models.stamo`).

- **Learning** (:meth:`StaMoAgent.update`): on slices ``[B, K]`` (``K = max(probe_offsets)``), one
  AdamW step on the diffusion autoencoder's rectified-flow loss over one frame of each slice, then,
  for every ``k`` in ``probe_offsets``, one step of the latent-action probe ``k`` on the pairs
  ``(o_t, o_{t+k}, a_{t:t+k})`` the slices hold. The probes read the **frozen** encoder (no gradient into E: the
  tokens are trained by reconstruction only, as in StaMo) and learn from rows with recorded actions
  (``has_action``); video rows are skipped.
- **Latent action** (§3.2): ``Delta z = E(o_{t+k}) - E(o_t)`` ``[B, 2, D]`` (:meth:`StaMoAgent.latent_action`);
  a probe maps it (standardised by running statistics) to the action chunk ``a_{t:t+k}`` ``[B, k, A]``
  (eq. 4; MLP ``2D -> 256 -> 256 -> kA``, or linear with ``probe_hidden=0``).
- **Pseudo-labels for video** (§3.4): :meth:`StaMoAgent.write_pseudo_labels` writes ``m_t = E(o_{t+1}) -
  E(o_t)`` (flattened, ``[2D]``) into the buffer's ``latent_action`` extra for every stored transition of
  action-less segments (or all). Since ``m`` telescopes, ``E(o_{t+k}) - E(o_t) = sum_i m_{t+i}``.
- **Co-training** (§4.5, Table 5 at our scale; ``cotrain=True``): a goal-conditioned behaviour-cloning
  policy ``pi(o_t, o_{t+k}) -> a_t`` with its own small pixel (or state) encoder (reading ``o_t`` and
  ``o_{t+k} - o_t``: ``bc_goal_input``), trained on every
  ``(o_t, o_{t+k})`` pair (``k = cotrain_offset``): on rows with recorded actions the target is ``a_t``, on video rows
  the **pseudo-action** ``probe_k(Delta z)[0]`` (the latent action decoded by the probe that was fitted on
  the labelled rows). How much of the data is labelled is a property of the dataset (e.g. 1 part with
  actions + 4 parts stored with ``extend(..., actions=False)``).
- **Goal reaching** (§4.7, Table 6: "frozen encoders + trained head"): :meth:`StaMoAgent.infer_task` turns a
  goal image into its tokens ``E(o_goal)``. With ``goal_policy="head"`` (the default) a goal head on the frozen
  encoder maps ``(E(o_t), E(o_goal) - E(o_t))`` to ``a_t``; it is trained on hindsight goals, every labelled
  pair ``(o_t, o_{t+k}, a_t)`` of the slices with ``k`` drawn per row from ``probe_offsets``
  (:meth:`StaMoAgent.goal_head_loss`). The paper leaves the head's training data open (appendix, unverified);
  hindsight pairs are what an action-labelled random dataset offers. With ``goal_policy="probe"`` the policy
  feeds ``E(o_goal) - E(o_t)`` to the latent-action probe of ``goal_offset`` and executes the chunk's first
  action (MPC); the probe was fitted on ``k``-step differences, so with ``goal_clip`` a larger difference is
  scaled down to the mean ``k``-step norm (its direction kept). ``goal_policy="cotrained"`` acts with the
  co-trained BC policy.
- **Without a task** the policy is the data-collection policy of the spec's CPU setting: uniform random
  actions, each held for ``hold_min .. hold_max`` steps (so that motion is visible), drawn from a
  per-env generator seeded in the carry. It stores a zero ``latent_action`` extra with every step, so
  that the buffer has the column the pseudo-labels are written into. Reward tasks are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.agents.base import (
    Agent,
    GoalObservation,
    Policy,
    RewardSamples,
    SampleSpec,
    Task,
    UnsupportedTaskError,
    check_obs_shape,
    resolve_device,
    scalar_metrics,
)
from latentrl.world_models.layers import RunningMeanStd, gather_batch, make_adam, mlp
from latentrl.world_models.stamo import COMPRESSIONS, StaMoModel

__all__ = ["PRESETS", "GoalBCNet", "GoalHead", "LatentActionProbe", "StaMoAgent", "StaMoBCPolicy", "StaMoCollectPolicy",
           "StaMoConfig", "StaMoGoalPolicy", "StaMoHeadPolicy"]

OBS_TYPES = ("pixels", "state")
BC_GOAL_INPUTS = ("frames", "difference")  # what GoalBCNet reads beside o_t (StaMoConfig.bc_goal_input)
LATENT_ACTION = "latent_action"


@dataclass
class StaMoConfig:
    """StaMo hyperparameters; the defaults are the spec's CPU configuration (§6)."""

    obs_type: Literal["pixels", "state"] = "pixels"
    """``"pixels"`` (single 64x64 frames) or ``"state"`` (an MLP tokenizer; StaMo itself reads pixels)."""
    token_dim: int = 128
    """Dimension D of each token (the reference: 1024; Table 8 shows 256-1024 barely matters)."""
    num_tokens: int = 2
    """Tokens per frame (StaMo: 2)."""
    stem_channels: tuple[int, ...] = (32, 64)
    """Hidden channels of the conv patch stem (then ``token_dim``; stride 2 each: 64x64 -> 8x8 patches)."""
    encoder_blocks: int = 2
    """Self-attention blocks over the patch features before compression."""
    heads: int = 4
    """Attention heads (encoder and decoder)."""
    compression: Literal["transposed", "queries"] = "transposed"
    """How E compresses the patch features to the tokens: the reference's transposed attention (a linear map
    over the patch positions, then blocks over the channels) or learned queries (``compress``)."""
    compress: tuple[int, ...] = (16, 4)
    """``compression="queries"``: query counts of the stages before the last (which has ``num_tokens``)."""
    pooled_dim: int = 256
    """Size of the pooled vector (AdaLN conditioning of the decoder)."""
    state_patches: int = 8
    """State observations: pseudo-patch tokens the state MLP makes."""
    decoder_dim: int = 128
    """Width of the DiT decoder."""
    decoder_blocks: int = 4
    """DiT blocks."""
    patch: int = 8
    """Decoder patch size (64x64 -> 64 DiT tokens)."""
    sample_steps: int = 20
    """Euler steps of the flow sampler (spec: 20-50)."""
    prediction: Literal["x", "v"] = "x"
    """What the DiT outputs: ``"x"`` x0 (velocity ``(z - x0_hat) / max(sigma, 0.05)``; pixel space) or ``"v"``
    the velocity itself (the reference's latent-space SD3). The loss is the velocity MSE either way."""
    sigma_shift: float = 3.0
    """SD3's timestep shift of the training and sampling sigmas (``FlowMatchEulerDiscreteScheduler(shift=3.0)``
    in SD3-medium's config, which the reference trains with); 1: the plain logit-normal."""
    lr: float = 3e-4
    """AdamW learning rate of the autoencoder (3e-4 from scratch; the reference's 3e-5 fine-tunes SD3)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (the reference's)."""
    weight_decay: float = 1e-3
    """AdamW weight decay (the reference's)."""
    batch_size: int = 32
    """Frames per autoencoder update."""
    probe_offsets: tuple[int, ...] = (1, 2, 4, 8)
    """Offsets k of the latent-action probes (one probe per k)."""
    probe_hidden: int = 256
    """Hidden width of the probe MLPs (two layers); 0: a linear probe."""
    probe_batch_size: int = 32
    """Pairs per probe update (for each k)."""
    probe_lr: float = 1e-3
    """Adam learning rate of the probes."""
    goal_offset: int = 8
    """The probe the goal policy reads (one of ``probe_offsets``)."""
    goal_clip: bool = True
    """Scale a goal difference down to the mean ``goal_offset``-step norm before the probe reads it."""
    goal_policy: Literal["head", "probe", "cotrained"] = "head"
    """Goal tasks act with the goal head trained on hindsight goals (``head``), with the latent-action probe on
    token differences (``probe``), or with the co-trained BC policy (``cotrained``). The goal head exists only
    with ``head``, so model files written before it (which say ``probe``) load unchanged."""
    goal_head_hidden: int = 256
    """Hidden width of the goal head's MLP (two layers); 0: a linear head (Table 6's)."""
    goal_head_lr: float = 1e-3
    """Adam learning rate of the goal head."""
    cotrain: bool = True
    """Train the goal-conditioned BC policy on labelled + pseudo-labelled pairs."""
    cotrain_offset: int = 4
    """The goal of a BC pair is ``o_{t+k}`` with this ``k`` (one of ``probe_offsets``)."""
    bc_channels: int = 32
    """Channels of the BC policy's conv encoder (pixels) / width of its MLP (states: 8x)."""
    bc_lr: float = 1e-3
    """Adam learning rate of the BC policy."""
    bc_goal_input: Literal["frames", "difference"] = "frames"
    """What the BC policy's encoder sees besides ``o_t``: the goal frame itself (``frames``) or its difference to
    ``o_t`` (``difference``). Every preset sets ``difference``: with the two frames, a reacher frame pair is nearly
    the same image across the batch and Adam at ``bc_lr`` 1e-3 can silence the conv trunk in its first 25 updates
    (docs/bench_stamo/bc_collapse.py); the difference puts the motion, which is what sets the action, in the input.
    The dataclass keeps ``frames`` so model files written before this field load with the inputs they were
    trained on."""
    hold_min: int = 1
    """The collection policy holds each random action at least this many steps."""
    hold_max: int = 4
    """... and at most this many."""

    def __post_init__(self) -> None:
        if self.obs_type not in OBS_TYPES:
            raise ValueError(f"StaMoConfig.obs_type must be one of {OBS_TYPES}, got {self.obs_type!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"StaMoConfig.compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.goal_policy not in ("head", "probe", "cotrained"):
            raise ValueError(f"StaMoConfig.goal_policy must be 'head', 'probe' or 'cotrained', got "
                             f"{self.goal_policy!r}")
        if self.bc_goal_input not in BC_GOAL_INPUTS:
            raise ValueError(f"StaMoConfig.bc_goal_input must be one of {BC_GOAL_INPUTS}, got {self.bc_goal_input!r}")
        if self.goal_head_hidden < 0:
            raise ValueError(f"StaMoConfig.goal_head_hidden must be >= 0, got {self.goal_head_hidden}")
        self.stem_channels = tuple(int(c) for c in self.stem_channels)
        self.compress = tuple(int(c) for c in self.compress)
        self.betas = tuple(float(b) for b in self.betas)
        self.probe_offsets = tuple(int(k) for k in self.probe_offsets)
        for name in ("token_dim", "num_tokens", "heads", "pooled_dim", "decoder_dim", "decoder_blocks", "patch",
                     "sample_steps", "batch_size", "probe_batch_size", "hold_min", "bc_channels", "state_patches"):
            if getattr(self, name) < 1:
                raise ValueError(f"StaMoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.probe_offsets or min(self.probe_offsets) < 1:
            raise ValueError(f"StaMoConfig.probe_offsets must be offsets >= 1, got {self.probe_offsets}")
        for name in ("goal_offset", "cotrain_offset"):
            if getattr(self, name) not in self.probe_offsets:
                raise ValueError(f"StaMoConfig.{name}={getattr(self, name)} must be one of probe_offsets "
                                 f"{self.probe_offsets} (it reads that probe)")
        if self.hold_max < self.hold_min:
            raise ValueError(f"StaMoConfig.hold_max ({self.hold_max}) must be >= hold_min ({self.hold_min})")


PRESETS: dict[str, dict[str, Any]] = {
    # The spec's CPU configuration (§6): D = 128, conv stem + 2 blocks -> 64 -> 16 -> 4 -> 2 tokens, DiT 4 x 128.
    "paper": {"bc_goal_input": "difference"},
    # Half-width decoder and fewer sampler steps for a 2-core CPU.
    "small": {"decoder_dim": 96, "decoder_blocks": 3, "sample_steps": 20, "batch_size": 32,
              "bc_goal_input": "difference"},
    # Tiny networks for tests.
    "smoke": {"token_dim": 16, "stem_channels": (8, 8), "encoder_blocks": 1, "heads": 2, "compress": (4,),
              "pooled_dim": 16, "state_patches": 4, "decoder_dim": 16, "decoder_blocks": 1, "sample_steps": 2,
              "batch_size": 8, "probe_offsets": (1, 2), "probe_hidden": 16, "probe_batch_size": 8, "goal_offset": 2,
              "cotrain_offset": 2, "bc_channels": 4, "goal_head_hidden": 16,
              "bc_goal_input": "difference"},
}


# ------------------------------------------------------------------------------------------ heads


class LatentActionProbe(nn.Module):
    """``Delta z`` ``[B, N, D]`` -> action chunk ``[B, k, A]``: running standardisation of the flattened
    difference, then an MLP (``hidden`` > 0, two layers) or a linear map. Keeps the running mean of
    ``||Delta z||`` (``delta_norm``) to scale far goals (``goal_clip``)."""

    def __init__(self, in_dim: int, k: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.k, self.action_dim = int(k), int(action_dim)
        self.stats = RunningMeanStd((in_dim,))
        self.net = mlp(in_dim, [hidden, hidden], k * action_dim) if hidden > 0 else nn.Linear(in_dim, k * action_dim)
        self.register_buffer("delta_norm", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def observe(self, delta: Tensor, mask: Tensor | None = None) -> None:
        """Fold a batch of training differences ``[B, N, D]`` into the running statistics; ``mask`` ``[B]``
        (bool): only those rows, with fixed shapes (no host sync; no row: nothing changes).

        Under data-parallel training (in training mode) the batch is every rank's rows together
        (``gather_batch``), so ``stats`` and ``delta_norm`` stay identical on all ranks and equal one process's."""
        flat = delta.flatten(1)
        self.stats.update(flat, mask=mask)
        weight = flat.new_ones(flat.shape[0]) if mask is None else mask.reshape(-1).to(flat.dtype)
        norms = torch.stack([flat.norm(dim=-1) * weight, weight], dim=1)  # [B, 2]: one gather for both
        if self.training:
            norms = gather_batch(norms)
        total = self.seen + norms[:, 1].sum().to(self.seen.dtype)
        denominator = total.clamp_min(1)  # 0 only before any row was seen
        self.delta_norm.mul_(self.seen / denominator).add_(norms[:, 0].sum() / denominator)
        self.seen.copy_(total)

    def forward(self, delta: Tensor) -> Tensor:
        flat = delta.flatten(1)
        x = (flat - self.stats.mean) / torch.sqrt(self.stats.var + 1e-8)
        return self.net(x.float()).reshape(-1, self.k, self.action_dim)


class GoalHead(nn.Module):
    """The goal head: ``(E(o_t), E(o_goal) - E(o_t))`` ``[B, N, D]`` each -> ``a_t`` ``[B, A]``; running
    standardisation of the two flattened inputs side by side, then an MLP (``hidden`` > 0, two layers) or a
    linear map (Table 6's head)."""

    def __init__(self, latent_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.action_dim = int(action_dim)
        self.stats = RunningMeanStd((2 * latent_dim,))
        self.net = mlp(2 * latent_dim, [hidden, hidden], action_dim) if hidden > 0 else \
            nn.Linear(2 * latent_dim, action_dim)

    @staticmethod
    def inputs(tokens: Tensor, delta: Tensor) -> Tensor:
        return torch.cat([tokens.flatten(1), delta.flatten(1)], dim=-1)

    @torch.no_grad()
    def observe(self, tokens: Tensor, delta: Tensor, mask: Tensor | None = None) -> None:
        """Fold a batch into the running statistics; ``mask`` ``[B]`` (bool): only those rows (data-parallel:
        every rank's rows, see :meth:`RunningMeanStd.update`)."""
        self.stats.update(self.inputs(tokens, delta), mask=mask)

    def forward(self, tokens: Tensor, delta: Tensor) -> Tensor:
        x = self.inputs(tokens, delta)
        return self.net(((x - self.stats.mean) / torch.sqrt(self.stats.var + 1e-8)).float())


class GoalBCNet(nn.Module):
    """The co-trained goal-conditioned policy ``pi(o_t, o_goal) -> a_t``, with its own encoder: a small
    conv net on ``o_t`` and the goal stacked along channels (pixels) or an MLP on the two states. ``goal_input``:
    the goal as it is (``frames``) or as ``o_goal - o_t`` (``difference``, see ``StaMoConfig.bc_goal_input``)."""

    def __init__(self, obs_key: str, obs_shape: Sequence[int], action_dim: int, channels: int = 32,
                 goal_input: str = "frames"):
        super().__init__()
        if goal_input not in BC_GOAL_INPUTS:
            raise ValueError(f"GoalBCNet: goal_input must be one of {BC_GOAL_INPUTS}, got {goal_input!r}")
        self.obs_key, self.obs_shape, self.goal_input = obs_key, tuple(int(s) for s in obs_shape), goal_input
        if obs_key == "pixels":
            c, h, w = self.obs_shape
            self.trunk = nn.Sequential(
                nn.Conv2d(2 * c, channels, 4, 2, 1), nn.ReLU(), nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.ReLU(),
                nn.Conv2d(2 * channels, 2 * channels, 4, 2, 1), nn.ReLU(), nn.Flatten())
            feat = 2 * channels * (h // 8) * (w // 8)
        else:
            self.trunk = nn.Sequential(nn.Linear(2 * self.obs_shape[0], 8 * channels), nn.ReLU())
            feat = 8 * channels
        self.head = mlp(feat, [256], action_dim)

    def inputs(self, obs: Tensor, goal: Tensor) -> Tensor:
        """What the trunk reads: ``o_t`` and the goal (or ``o_goal - o_t``) side by side; frames (uint8) scaled
        so that ``o_t`` lies in [-1, 1] and the goal or the difference at the same scale."""
        obs, goal = obs.float(), goal.float()
        if self.goal_input == "difference":
            goal = goal - obs
        if self.obs_key == "pixels":
            return torch.cat([obs / 127.5 - 1.0, goal / 127.5 - float(self.goal_input == "frames")], dim=1)
        return torch.cat([obs, goal], dim=-1)

    def forward(self, obs: Tensor, goal: Tensor) -> Tensor:
        return self.head(self.trunk(self.inputs(obs, goal)))


# ----------------------------------------------------------------------------------------- policies


class StaMoCollectPolicy(Policy):
    """Uniform random actions in [-1, 1], each held ``hold_min .. hold_max`` steps; per-env draws from a
    generator seeded by the carry's ``seed`` (drawn in :meth:`start_episode`). Stores a zero
    ``latent_action`` extra ``[N, latent_dim]`` (the column pseudo-labels are written into)."""

    def __init__(self, obs_key: str, obs_shape: Sequence[int], action_dim: int, latent_dim: int, *,
                 hold_min: int = 1, hold_max: int = 4, explore: bool = True):
        super().__init__(obs_key, obs_shape, action_dim, explore=explore)
        self.latent_dim, self.hold_min, self.hold_max = int(latent_dim), int(hold_min), int(hold_max)

    def init_carry(self, batch_size: int) -> TensorDict:
        carry = super().init_carry(batch_size)
        carry["seed"] = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        carry["held_action"] = torch.zeros(batch_size, self.action_dim, device=self.device)
        carry["hold_left"] = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        return carry

    def start_episode(self, batch_size: int) -> TensorDict:
        carry = self.init_carry(batch_size)
        carry["seed"] = torch.randint(0, 2**62, (batch_size,), dtype=torch.int64).to(self.device)
        return carry

    def act(self, x: Tensor | None, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        carry = carry.clone()
        for i in range(carry.batch_size[0]):
            if int(carry["hold_left"][i]) > 0:
                continue
            g = torch.Generator().manual_seed(int(carry["seed"][i]))
            carry["held_action"][i] = (torch.rand(self.action_dim, generator=g) * 2 - 1).to(self.device)
            carry["hold_left"][i] = int(torch.randint(self.hold_min, self.hold_max + 1, (), generator=g))
            carry["seed"][i] = int(torch.randint(0, 2**62, (), generator=g))
        carry["hold_left"] = carry["hold_left"] - 1
        return carry["held_action"].clone(), carry

    def extras(self, carry: TensorDict | None = None) -> dict[str, Tensor]:
        carry = self.carry if carry is None else carry
        n = 0 if carry is None else carry.batch_size[0]
        return {LATENT_ACTION: torch.zeros(n, self.latent_dim, device=self.device)}


class _TokenGoalPolicy(Policy):
    """A goal policy that reads the goal's tokens: ``goal`` ``[1 or N, num_tokens * token_dim]`` (flattened)."""

    def __init__(self, world_model: StaMoModel, action_dim: int, goal: Tensor):
        super().__init__(world_model.obs_key, world_model.obs_shape, action_dim)
        self.world_model = world_model
        goal = goal.detach().to(self.device, torch.float32)
        goal = goal.reshape(1, -1) if goal.dim() == 1 else goal.reshape(goal.shape[0], -1)
        want = world_model.num_tokens * world_model.token_dim
        if goal.shape[-1] != want:
            raise ValueError(f"a StaMo goal is the goal frame's tokens flattened ({want} values), got "
                             f"shape {list(goal.shape)}")
        self.register_buffer("goal", goal)

    def tokens_and_delta(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``E(o_t)`` and ``E(o_goal) - E(o_t)``, both ``[N, num_tokens, token_dim]``."""
        tokens = self.world_model.encode(x)
        goal = self.goal.expand(x.shape[0], -1) if self.goal.shape[0] == 1 else self.goal
        if goal.shape[0] != x.shape[0]:
            raise ValueError(f"the goal task holds {goal.shape[0]} goals but the observation has {x.shape[0]} envs")
        return tokens, goal.reshape(tokens.shape) - tokens


class StaMoGoalPolicy(_TokenGoalPolicy):
    """Goal-image planning with the probe: ``a_t = probe_k(E(o_goal) - E(o_t))[0]`` each step (the module
    docstring)."""

    def __init__(self, world_model: StaMoModel, probe: LatentActionProbe, goal: Tensor, *, clip: bool = True):
        super().__init__(world_model, probe.action_dim, goal)
        self.probe, self.clip = probe, bool(clip)

    def act(self, x: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        _, delta = self.tokens_and_delta(x)
        if self.clip and float(self.probe.delta_norm) > 0:
            norm = delta.flatten(1).norm(dim=-1).clamp_min(1e-8)
            delta = delta * (self.probe.delta_norm / norm).clamp(max=1.0).reshape(-1, 1, 1)
        return self.probe(delta)[:, 0].clamp(-1.0, 1.0), carry


class StaMoHeadPolicy(_TokenGoalPolicy):
    """Goal-image planning with the goal head: ``a_t = head(E(o_t), E(o_goal) - E(o_t))`` each step."""

    def __init__(self, world_model: StaMoModel, head: GoalHead, goal: Tensor):
        super().__init__(world_model, head.action_dim, goal)
        self.head = head

    def act(self, x: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        return self.head(*self.tokens_and_delta(x)).clamp(-1.0, 1.0), carry


class StaMoBCPolicy(Policy):
    """The co-trained goal-conditioned policy ``pi(o_t, o_goal)``; ``goal`` ``[1 or N, *obs_shape]`` (floats)."""

    def __init__(self, bc: GoalBCNet, goal: Tensor, action_dim: int):
        super().__init__(bc.obs_key, bc.obs_shape, action_dim)
        self.bc = bc
        goal = goal.detach().to(self.device, torch.float32).reshape(-1, *bc.obs_shape)
        self.register_buffer("goal", goal)

    def act(self, x: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        goal = self.goal.expand(x.shape[0], *self.goal.shape[1:]) if self.goal.shape[0] == 1 else self.goal
        return self.bc(x, goal).clamp(-1.0, 1.0), carry


# -------------------------------------------------------------------------------------------- agent


class StaMoAgent(Agent):
    """The StaMo agent; build it with :meth:`from_env` or ``make_agent("stamo", env)``."""

    name = "stamo"
    config_class = StaMoConfig
    presets = PRESETS
    inference_modules = ("world_model", "probes", "bc", "goal_head")

    def __init__(self, config: StaMoConfig, obs_shape: tuple[int, ...], action_dim: int,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.config = cfg = config
        self.device = resolve_device(device)
        self.obs_shape = check_obs_shape(cfg.obs_type, obs_shape)
        self.action_dim = int(action_dim)
        self.obs_key = cfg.obs_type
        self.world_model = StaMoModel(
            cfg.obs_type, self.obs_shape, token_dim=cfg.token_dim, num_tokens=cfg.num_tokens,
            stem_channels=cfg.stem_channels, encoder_blocks=cfg.encoder_blocks, heads=cfg.heads,
            compression=cfg.compression, compress=cfg.compress,
            pooled_dim=cfg.pooled_dim, state_patches=cfg.state_patches, decoder_dim=cfg.decoder_dim,
            decoder_blocks=cfg.decoder_blocks, patch=cfg.patch, sample_steps=cfg.sample_steps,
            prediction=cfg.prediction, sigma_shift=cfg.sigma_shift)
        self.latent_dim = cfg.num_tokens * cfg.token_dim
        self.probes = nn.ModuleDict({str(k): LatentActionProbe(self.latent_dim, k, self.action_dim, cfg.probe_hidden)
                                     for k in cfg.probe_offsets})
        self.bc = GoalBCNet(cfg.obs_type, self.obs_shape, self.action_dim, cfg.bc_channels, cfg.bc_goal_input)
        self.goal_head = GoalHead(self.latent_dim, self.action_dim, cfg.goal_head_hidden) \
            if cfg.goal_policy == "head" else None
        self.to(self.device)
        self._optimizer = make_adam(self.world_model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                    weight_decay=cfg.weight_decay, decoupled_weight_decay=True)
        self._probe_optimizer = make_adam(self.probes.parameters(), lr=cfg.probe_lr)
        self._bc_optimizer = make_adam(self.bc.parameters(), lr=cfg.bc_lr)
        self._goal_head_optimizer = None if self.goal_head is None else \
            make_adam(self.goal_head.parameters(), lr=cfg.goal_head_lr)

    def sample_spec(self) -> SampleSpec:
        """Slices ``[B, K]`` with ``K = max(probe_offsets)``: every pair ``(o_t, o_{t+k}, a_{t:t+k})`` for
        ``k <= K`` is read from one slice, and the flow loss takes one frame of each slice."""
        cfg = self.config
        return SampleSpec(batch_size=cfg.batch_size, horizon=max(cfg.probe_offsets), keys=(self.obs_key,))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = {"model": self._optimizer, "probes": self._probe_optimizer, "bc": self._bc_optimizer}
        if self._goal_head_optimizer is not None:
            optimizers["goal_head"] = self._goal_head_optimizer
        return optimizers

    # ------------------------------------------------------------------------------- latent actions
    @torch.no_grad()
    def latent_action(self, obs: Tensor, target: Tensor) -> Tensor:
        """``E(target) - E(obs)`` ``[B, num_tokens, token_dim]`` (the frozen encoder; §3.2)."""
        both = self.world_model.encode(torch.cat([obs, target]).to(self.device))
        return both[obs.shape[0]:] - both[:obs.shape[0]]

    @torch.no_grad()
    def slice_latent_actions(self, batch: TensorDict) -> tuple[Tensor, dict[int, Tensor]]:
        """``E(o_0)`` and the latent actions ``{k: E(o_k) - E(o_0)}`` for every ``k`` in ``probe_offsets`` of
        slices ``[B, L]`` (see :meth:`pair`), from one encoder pass that reads ``o_0`` once."""
        obs = batch[self.obs_key][:, 0].to(self.device)
        ks = self.config.probe_offsets
        encoded = self.world_model.encode(torch.cat([obs, *(self.pair(batch, k)[1] for k in ks)]))
        tokens, *targets = encoded.split(obs.shape[0])
        return tokens, {k: target - tokens for k, target in zip(ks, targets, strict=True)}

    def pair(self, batch: TensorDict, k: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """``(o_t, o_{t+k}, a_{t:t+k} [B, k, A] or None, labelled [B])`` of a fixed-offset batch
        (``sample(offset=k)``) or of slices ``[B, L]`` with ``L >= k`` (their first step)."""
        key = self.obs_key
        if batch.batch_dims == 1:
            if "target" not in batch.keys():
                raise ValueError(f"pair(k={k}) needs slices [B, L >= {k}] or a sample(offset={k}) batch")
            obs, target = batch[key], batch["target", key]
            action = batch["action"] if "action" in batch.keys() else None
            labelled = batch["has_action"].reshape(-1)
        else:
            if batch.batch_size[1] < k:
                raise ValueError(f"pair(k={k}) needs slices of at least {k} steps, got {batch.batch_size[1]}")
            obs, target = batch[key][:, 0], batch["next", key][:, k - 1]
            action = batch["action"][:, :k] if "action" in batch.keys() else None
            labelled = batch["has_action"][:, :k].all(1)
        if action is not None:
            action = action.to(self.device).float()
        return obs.to(self.device), target.to(self.device), action, labelled.to(self.device)

    def probe_loss(self, k: int, batch: TensorDict, *, observe: bool = True, delta: Tensor | None = None) -> Tensor:
        """MSE of probe ``k`` on the labelled rows of a batch (see :meth:`pair`): a masked mean over all rows,
        ``0`` (with a zero gradient) when none is labelled. ``delta``: the rows' latent actions, when known.

        Fixed shapes (no host sync), so every data-parallel rank steps the probes whatever its rows. Under
        data-parallel training (in training mode) the mean is over the global batch's labelled rows (each
        rank's squared errors and labels gathered, the gradient flowing back to its own rows) and ``observe``
        folds the global batch: the single-process loss, statistics and (averaged) gradient."""
        obs, target, action, labelled = self.pair(batch, k)
        if action is None:  # a batch without an action column: nothing is labelled
            action = torch.zeros(obs.shape[0], k, self.action_dim, device=self.device)
            labelled = torch.zeros_like(labelled, dtype=torch.bool)
        delta = self.latent_action(obs, target) if delta is None else delta
        probe = self.probes[str(k)]
        if observe:
            probe.observe(delta, labelled)
        weight = labelled.reshape(-1).to(action.dtype)
        err = (probe(delta) - action).square().flatten(1).sum(1) * weight  # [B]
        both = torch.stack([err, weight], dim=1)
        if self.training:
            both = gather_batch(both, grad=True)
        return both[:, 0].sum() / (both[:, 1].sum() * (k * self.action_dim)).clamp_min(1)

    @torch.no_grad()
    def pseudo_actions(self, k: int, delta: Tensor) -> Tensor:
        """Pseudo-actions ``[B, k, A]`` of latent actions ``[B, N, D]`` (or flattened ``[B, N * D]``)."""
        delta = delta.reshape(delta.shape[0], self.config.num_tokens, self.config.token_dim).to(self.device)
        return self.probes[str(k)](delta).clamp(-1.0, 1.0)

    def cotrain_loss(self, batch: TensorDict, k: int | None = None, *, delta: Tensor | None = None) -> Tensor:
        """BC loss of ``pi(o_t, o_{t+k}) -> a_t`` (see :meth:`pair`): recorded actions where labelled, the
        probe's pseudo-actions ``probe_k(E(o_{t+k}) - E(o_t))[0]`` elsewhere (computed for every row and
        selected: fixed shapes, no host sync). ``delta``: the rows' latent actions, when known."""
        k = self.config.cotrain_offset if k is None else int(k)
        obs, target, action, labelled = self.pair(batch, k)
        label = action[:, 0] if action is not None else torch.zeros(obs.shape[0], self.action_dim, device=self.device)
        delta = self.latent_action(obs, target) if delta is None else delta
        pseudo = self.pseudo_actions(k, delta)[:, 0]
        label = torch.where(labelled.reshape(-1, 1), label, pseudo)
        return (self.bc(obs, target) - label).square().mean()

    def goal_head_loss(self, batch: TensorDict, offsets: Tensor | None = None, *, observe: bool = True,
                       tokens: Tensor | None = None, deltas: dict[int, Tensor] | None = None) -> Tensor:
        """MSE of the goal head on hindsight goals of slices ``[B, L >= max(probe_offsets)]``: row ``i`` pairs
        ``o_0`` with the goal ``o_{k_i}`` (``offsets`` ``[B]``, each one of ``probe_offsets``; drawn uniformly
        when None) and is labelled with ``a_0``. A masked mean over the rows whose ``a_{0:k_i}`` are recorded
        (video rows say where the arm went, not which action took it there). ``tokens`` ``E(o_0)`` and
        ``deltas`` ``{k: E(o_k) - E(o_0)}``, when known. Fixed shapes (no host sync unless ``offsets`` is
        given); data-parallel as :meth:`probe_loss`."""
        if self.goal_head is None:
            raise RuntimeError(f"this stamo agent has no goal head (goal_policy={self.config.goal_policy!r})")
        ks = list(self.config.probe_offsets)
        if batch.batch_dims != 2 or batch.batch_size[1] < max(ks):
            raise ValueError(f"goal_head_loss needs slices [B, L >= {max(ks)}], got batch size "
                             f"{list(batch.batch_size)}")
        if tokens is None or deltas is None:
            tokens, deltas = self.slice_latent_actions(batch)
        rows = torch.arange(tokens.shape[0], device=self.device)
        if offsets is None:
            choice = torch.randint(len(ks), (tokens.shape[0],), device=self.device)
        else:
            offsets = torch.as_tensor(offsets, device=self.device).reshape(-1)
            known = offsets.reshape(-1, 1) == torch.tensor(ks, device=self.device)
            if offsets.shape[0] != tokens.shape[0] or not bool(known.any(1).all()):
                raise ValueError(f"offsets must be [{tokens.shape[0]}] values from probe_offsets {ks}, got "
                                 f"{offsets.tolist()}")
            choice = known.float().argmax(1)
        delta = torch.stack([deltas[k] for k in ks])[choice, rows]
        labelled = torch.stack([self.pair(batch, k)[3].reshape(-1) for k in ks])[choice, rows]
        if "action" in batch.keys():
            action = batch["action"][:, 0].to(self.device).float()
        else:  # nothing labelled
            action = torch.zeros(tokens.shape[0], self.action_dim, device=self.device)
            labelled = torch.zeros_like(labelled)
        if observe:
            self.goal_head.observe(tokens, delta, labelled)
        weight = labelled.to(action.dtype)
        err = (self.goal_head(tokens, delta) - action).square().sum(1) * weight  # [B]
        both = torch.stack([err, weight], dim=1)
        if self.training:
            both = gather_batch(both, grad=True)
        return both[:, 0].sum() / (both[:, 1].sum() * self.action_dim).clamp_min(1)

    @torch.no_grad()
    def write_pseudo_labels(self, buffer, *, only_video: bool = True, batch_size: int = 256) -> int:
        """Write ``m_t = E(o_{t+1}) - E(o_t)`` (flattened ``[num_tokens * token_dim]``) into the buffer's
        ``latent_action`` extra at every transition of action-less segments (``only_video=False``: of every
        segment). The buffer must store that column (the collection policy's extra); a dataset opened
        read-only is changed in memory only. Returns the number of rows written."""
        storage = buffer.storage
        if storage is None or LATENT_ACTION not in storage.keys():
            raise KeyError(f"the buffer stores no {LATENT_ACTION!r} column; collect with the stamo policy (its "
                           f"extras hold it) or store a zero [{self.latent_dim}] {LATENT_ACTION!r} with each step")
        column = storage[LATENT_ACTION]
        if tuple(column.shape[1:]) != (self.latent_dim,):
            raise ValueError(f"the buffer's {LATENT_ACTION!r} column is {list(column.shape[1:])}, this agent's latent "
                             f"actions are [{self.latent_dim}]")
        was_training = self.training
        self.eval()
        written = 0
        table = buffer.episodes()
        for i in range(table.batch_size[0]):
            seg = table[i]
            if only_video and bool(seg["has_action"]):
                continue
            length = int(seg["length"])
            if length < 2:
                continue
            frames = buffer.episode(int(seg["id"]), keys=[self.obs_key])[self.obs_key]
            tokens = torch.cat([self.world_model.encode(frames[j:j + batch_size].to(self.device))
                                for j in range(0, length, batch_size)])
            m = (tokens[1:] - tokens[:-1]).flatten(1).to(column.device, column.dtype)
            rows = int(seg["start"]) + torch.arange(length - 1)
            slots = int(seg["env"]) * buffer.per_env + rows % buffer.per_env
            column[slots] = m
            written += length - 1
        self.train(was_training)
        return written

    # ---------------------------------------------------------------------------------- tasks
    def policy(self, task: Task | None = None, *, explore: bool = False) -> Policy:
        cfg = self.config
        if task is None:
            return StaMoCollectPolicy(self.obs_key, self.obs_shape, self.action_dim, self.latent_dim,
                                      hold_min=cfg.hold_min, hold_max=cfg.hold_max, explore=explore)
        if task.info.get("kind") != "goal" or task.z is None:
            raise UnsupportedTaskError("the stamo policy takes a goal task (agent.infer_task(GoalObservation)) or "
                                       "none (the random data-collection policy)")
        if cfg.goal_policy == "cotrained":
            return StaMoBCPolicy(self.bc, task.z, self.action_dim)
        if cfg.goal_policy == "head":
            return StaMoHeadPolicy(self.world_model, self.goal_head, task.z)
        return StaMoGoalPolicy(self.world_model, self.probes[str(cfg.goal_offset)], task.z, clip=cfg.goal_clip)

    @torch.no_grad()
    def infer_task(self, spec: RewardSamples | GoalObservation) -> Task:
        """A goal observation ``[N]`` -> ``Task(z)``: the goal's tokens ``E(o_goal)`` flattened ``[N, 2D]``
        (``goal_policy="cotrained"``: the goal observation itself, flattened)."""
        if not isinstance(spec, GoalObservation):
            raise UnsupportedTaskError(f"stamo reaches goal images; it cannot represent a {type(spec).__name__} "
                                       "task (its latent actions carry no reward)")
        key = self.obs_key
        if key not in spec.obs.keys():
            raise KeyError(f"stamo (obs_type={key!r}) needs the goal observation to hold {key!r}; it has keys "
                           f"{sorted(map(str, spec.obs.keys()))}")
        x = spec.obs[key]
        if key == "pixels":
            if x.shape[-3] % 3:
                raise ValueError(f"goal pixels must be RGB frames [N, 3k, H, W], got {list(x.shape)}")
            x = x[..., -3:, :, :]  # a stacked goal: its newest frame (StaMo reads single frames)
        x = x.reshape(-1, *self.obs_shape).to(self.device)
        z = x.float().flatten(1) if self.config.goal_policy == "cotrained" else \
            self.world_model.encode(x).flatten(1)
        return Task(z=z, goal=spec.obs.select(key).clone(), info={"kind": "goal"})

    # --------------------------------------------------------------------------------- update
    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        """Flow loss on one frame per slice; probe ``k`` on each slice's ``(o_0, o_k)`` (labelled rows); BC
        co-training on ``(o_0, o_{cotrain_offset})`` (``cotrain``); the goal head on ``(o_0, o_k)`` with ``k``
        drawn per row (labelled rows; ``goal_policy="head"``)."""
        cfg = self.config
        out = self.world_model.loss(batch.to(self.device))
        self._optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self._optimizer.step()
        metrics = {k: v for k, v in out.items() if k != "loss"}
        # E(o_0) and the latent actions of every row, one encoder pass (the encoder is not trained by the heads).
        tokens, deltas = self.slice_latent_actions(batch)
        probe_losses = []
        for k in cfg.probe_offsets:
            loss = self.probe_loss(k, batch, delta=deltas[k])
            probe_losses.append(loss)
            metrics[f"probe_mse_{k}"] = loss.detach()
        # Always a step, so that every data-parallel rank steps. A global batch without labelled rows gives zero
        # gradients: Adam then moves the probes by its momentum alone (the one difference from skipping the step).
        self._probe_optimizer.zero_grad(set_to_none=True)
        torch.stack(probe_losses).sum().backward()
        self._probe_optimizer.step()
        if cfg.cotrain:
            bc_loss = self.cotrain_loss(batch, delta=deltas[cfg.cotrain_offset])
            self._bc_optimizer.zero_grad(set_to_none=True)
            bc_loss.backward()
            self._bc_optimizer.step()
            metrics["bc_mse"] = bc_loss.detach()
        if self.goal_head is not None:
            head_loss = self.goal_head_loss(batch, tokens=tokens, deltas=deltas)
            self._goal_head_optimizer.zero_grad(set_to_none=True)
            head_loss.backward()
            self._goal_head_optimizer.step()
            metrics["goal_head_mse"] = head_loss.detach()
        return scalar_metrics(metrics, self.device)  # tensors: no host sync per update

    def extra_state(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state.get("env_steps", 0))
