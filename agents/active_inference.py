"""Deep active inference: a Gaussian state-space model and expected-free-energy planning
(``shared/algorithms/active_inference.md`` §7-9; the model: :mod:`latentrl.world_models.active_inference`).

- **Learning** (:meth:`ActiveInferenceAgent.update`): one Adam step on the world model's variational
  free energy over ``[B, L]`` slices, and a reward head ``r(s)`` over posterior means trained by MSE
  on the batch's ``("next", "reward")`` where those are finite (NaN marks reward-free data; a batch
  without rewards skips it). No task reward shapes the world model.
- **Preferences** (:meth:`ActiveInferenceAgent.infer_task`): a goal image or state gives
  ``p~(s) = q(s|o_goal)`` (FER), stored as ``Task.z = [mean ‖ std]`` ``[N, 2D]`` (``info["kind"] =
  "goal"``). Reward examples (:class:`RewardSamples`) give log-preferences ``log p~(o) = r(s) /
  reward_temperature`` (FOU, MIL): a ridge-regression readout ``r(s) = w . phi(s) + b`` on the reward
  head's hidden features ``phi`` at the examples' posterior means, stored as ``Task.z = [w ‖ b]``
  ``[1, F + 1]`` (``info["kind"] = "reward"``); the risk of a rollout is then ``-sum_t r(mean_t) /
  reward_temperature``.
- **Scoring** (:func:`expected_free_energy`): per candidate, summed over the horizon and averaged
  over state samples, ``G = risk + ambiguity - epistemic_weight * epistemic`` with
  ``risk = KL(p(s_t|pi) || p~(s))`` ("state control", spec §1; with ``risk="latent_nll"`` the spec §7 scorer's
  FER form, ``E[-log p~(s_t)]`` under the prediction; with ``risk="latent_overlap"``
  ``-log N(mu_g; mean_t, std_t^2 + std_g^2)`` instead, each dimension weighed by what the model predicts; with
  ``risk="observation"`` for goal tasks AV's instrumental term ``||dec(s_t) - o_goal||^2 / (2 obs_std^2)``
  instead, and ``"observation_corrected"``
  the same on predictions corrected by the decoder's error now), ``ambiguity = E[H p(o|s)]`` (a
  constant under the fixed-variance decoder, reported for completeness) and ``epistemic`` the
  transition ensemble's information gain (:func:`~latentrl.world_models.active_inference.ensemble_epistemic`),
  or with ``epistemic="belief_change"`` AV's belief change from the imagined view,
  ``KL(fuse(p, q(s | dec(s'))) || p)`` (:meth:`~latentrl.world_models.active_inference.ActiveInferenceModel.
  view_epistemic`), computed for the ``epistemic_candidates`` lowest-risk candidates only (the others are
  screened out), as the spec's CPU configuration bounds its cost.
- **Planning** (:func:`plan`): random shooting (``planner="shooting"``: ``K`` uniform action
  sequences of horizon ``H``, argmin G) or CEM (``planner="cem"``: ``cem_iterations`` rounds of ``K``
  Gaussian candidates, refitted to the ``num_elites`` best; the best candidate seen is executed).
  Candidates of all envs are rolled out as one batch through ``world_model.imagine(..., num_samples)``.
  MPC: the plan's first action is executed and the plan is recomputed at every step.
- **Policy** (:class:`ActiveInferencePolicy`): the carry holds the belief (``mean``, ``std``), the
  previous action and (pixels) the frame stack. Without a task the policy **explores with the
  epistemic term only** (``G = -epistemic``). ``explore=True`` samples the executed candidate from
  ``softmax(-gamma G)`` instead of taking the argmin.
"""

from __future__ import annotations

from collections.abc import Callable
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
from latentrl.world_models.active_inference import (
    LOSS_METRICS,
    ActiveInferenceModel,
    PixelDecoder,
    decoder_choice_error,
)
from latentrl.world_models.layers import gather_batch, gaussian_kl, gaussian_log_prob, last_grad_norm, make_adam, mlp

__all__ = [
    "PRESETS",
    "ActiveInferenceAgent",
    "ActiveInferenceConfig",
    "ActiveInferencePolicy",
    "EFE_TERMS",
    "PLANNER_FIELDS",
    "LATENT_RISKS",
    "RISKS",
    "expected_free_energy",
    "nll_risk",
    "overlap_risk",
    "plan",
    "plan_value",
    "precision",
]

OBS_TYPES = ("pixels", "state")
RISKS = ("latent", "latent_nll", "latent_overlap", "observation", "observation_corrected")
LATENT_RISKS = ("latent", "latent_nll", "latent_overlap")  # compared with the goal belief, not the goal observation


@dataclass
class ActiveInferenceConfig:
    """Deep active inference hyperparameters; the defaults are the spec's CPU point_mass setting (§8) where it
    names one, and the settings measured to work on point_mass pixels where it does not or where its choice failed
    (``obs_std``, ``free_nats``, ``max_grad_norm``, ``decoder``; docs/bench_active_inference.md)."""

    obs_type: Literal["pixels", "state"] = "pixels"
    """``"pixels"`` (64x64 frames, stacked) or ``"state"``."""
    frame_stack: int = 2
    """Frames stacked for pixel observations (the latent can then carry velocity)."""
    latent_dim: int = 16
    """Dimensions of the Gaussian latent s."""
    encoder_depth: int = 16
    """DreamerV2 CNN depth (channels 16, 32, 64, 128) of the pixel encoder."""
    decoder_depth: int = 16
    """Depth of the pixel decoder."""
    decoder: Literal["conv", "broadcast"] = "broadcast"
    """Pixel decoder: ``"broadcast"``, a spatial broadcast decoder (the latent tiled over a 16x16 map with
    coordinate channels; ``world_models.active_inference.BroadcastDecoder``), or ``"conv"``, the spec's symmetric
    transposed convolutions from a 1x1 map (DreamerV2). Not the spec's default: on point_mass its latent orders
    goals by distance and goal success rose from 0.12 to 0.68 (docs/bench_active_inference.md)."""
    decoder_canvas: Literal["none", "add", "mask"] = "none"
    """``decoder="conv"``: a learned canvas image (``PixelDecoder(canvas=...)``): ``"add"`` adds it to the output,
    ``"mask"`` adds it and gates the network's image with a predicted per-pixel factor in (0, 1). ``"none"``
    (default): the spec's conv decoder, which has none. The broadcast decoder always adds one. On reacher neither
    reached check 1 (docs/bench_active_inference.md, "A canvas for the conv decoder")."""
    decode_frames: int = 1
    """Frames of the stack the pixel decoder draws in the free energy, newest last: 1, the spec's (the newest frame
    only), or up to ``frame_stack``; planning and ``decode`` use the newest. Not the spec's when > 1: with the newest
    frame alone the velocity is paid for only through the transition's KL, and on point_mass the belief did not
    carry the action (docs/bench_active_inference.md, "Check 2 against what the data lets a learned model read")."""
    hidden_dim: int = 256
    """Width of the encoder's last layer (and of the state MLPs)."""
    transition_hidden: int = 128
    """Width of each transition member's hidden layers."""
    transition_layers: int = 2
    """Hidden layers of each transition member."""
    ensemble_size: int = 5
    """Transition ensemble members (the epistemic signal is their disagreement)."""
    obs_std: float = 0.1
    """Fixed std of the Gaussian decoder (pixels in ``x / 255 - 0.5`` units; the spec names none: with 1.0 the
    latent collapsed on point_mass, docs/bench_active_inference.md)."""
    min_std: float = 0.01
    """Lower bound of every predicted std (the posterior's, and the transition prior's unless ``prior_min_std``)."""
    prior_min_std: float | None = None
    """Lower bound of the transition prior's std alone (None: ``min_std``). A broad posterior against a very sharp
    prior gives the KL bursts behind the lr-1e-3 run-away (docs/bench_active_inference.md, "The free-energy spike
    traced"); a floor on the prior alone bounds them and leaves the posterior free to be sharp."""
    kl_transition_weight: float = 1.0
    """Weight of KL(q(s_{t+1}|o_{t+1}) || p(s_{t+1}|s_t, a_t)) in the free energy."""
    kl_prior_weight: float = 0.1
    """Weight of KL(q(s|o) || N(0, I)) in the free energy."""
    free_nats: float = 3.0
    """Free nats of the transition KL (Dreamer's 3; not in the spec): below it the KL is not minimised (against
    collapse); 0 turns it off."""
    lr: float = 1e-3
    """Adam learning rate of the world model and the reward head."""
    max_grad_norm: float | None = 100.0
    """Clip the global gradient norm to this before each Adam step (Dreamer's 100); None: no clipping (the
    spec names none; docs/bench_active_inference.md has a 20k-update run that diverged without it)."""
    batch_size: int = 64
    """Slices per update."""
    seq_len: int = 1
    """Transitions per slice L (the buffer's ``horizon``); 1: one-step transitions."""
    overshooting: int = 1
    """Latent overshooting distance D (PlaNet's, the spec's optional "3-step latent overshooting"): the transition
    term averages KLs of each member's prior rolled 1..D steps against the posteriors there; 1 (default): one-step
    transitions only. Needs ``seq_len >= overshooting``."""
    inverse_weight: float = 0.0
    """Weight of an inverse-dynamics term added to the minimised objective (not the spec's, not part of the free
    energy; 0, the default: none): an MLP reads a_t from the belief means (mu_t, mu_{t+1}), its squared error
    weighted by this. It asks the encoder for the motion, which the free energy left out of point_mass's belief
    (docs/bench_active_inference.md, "Check 2: the belief carries no velocity")."""
    frame_difference: float = 0.0
    """Pixels: the encoder also reads the differences of consecutive stacked frames, times this (not the spec's;
    0, the default: the stacked frames alone). On point_mass the mass moves a sixth of a pixel per step; the
    inverse CNN that read a_t off the frames had such channels (x8), and without them the belief learnt no motion
    (docs/bench_active_inference.md, "The encoder trained on the inverse task first")."""
    goal_motion: Literal["still", "any"] = "still"
    """Pixels: what a goal image (one frame, tiled over the stack) asks for. ``"still"`` (the spec's, default):
    q(s|o_goal), the body there at rest. ``"any"`` (not the spec's): the place whatever the motion, q(s|o_goal)
    shifted and widened by what motion does to the belief in the training data
    (``world_models.active_inference.MotionStatistics``, tracked by each update on up to 16 of the batch's
    observations). Once the belief reads the velocity, the still goal asks the planner to be still as well as
    there (docs/bench_active_inference.md, "A goal image asks for rest"). A stacked goal observation is used
    as given either way."""
    planner: Literal["shooting", "cem"] = "shooting"
    """``"shooting"``: K uniform random sequences, argmin; ``"cem"``: cross-entropy method."""
    num_candidates: int = 1000
    """Candidate action sequences K per planning round."""
    plan_horizon: int = 5
    """Horizon H of each candidate sequence."""
    num_samples: int = 4
    """State samples J per candidate (``imagine``'s ``num_samples``)."""
    cem_iterations: int = 3
    """CEM rounds (``planner="cem"``)."""
    num_elites: int = 64
    """CEM elites refitted each round."""
    risk: Literal["latent", "latent_nll", "latent_overlap", "observation", "observation_corrected"] = "latent"
    """The risk of goal tasks: ``"latent"``, ``KL(p(s_t|pi) || q(s|o_goal))`` in latent space (spec §1's "state
    control" term; this package's default since issue 14 landed); ``"latent_nll"``, the spec §7 scorer's FER form
    ``risk_k = mean_j -log N(s'_j; mu_g, s_g)`` over predicted states ``s'_j ~ p(s_t|pi)``, here in closed form over
    each step's predicted Gaussian (:func:`nll_risk`: the KL plus the prediction's entropy, so a prediction is not
    rewarded for being vague; on point_mass it ranks and reaches as the KL does); ``"latent_overlap"`` (ours, not in
    the spec), ``-log N(mu_g; mu_t, s_t^2 + s_g^2)``, minus the log-probability that the predicted state and the goal
    belief coincide (``-log int p(s_t|pi) q(s|o_goal) ds``): each latent dimension weighed by the precision the
    model can predict it to, ``1 / (s_t^2 + s_g^2)``, not the goal belief's alone, ``1 / s_g^2``. Where q(s|o_goal)
    is far sharper than the transition (point_mass's position dimensions: s_g ~0.01, s_t ~0.1-0.3, the latter
    matching the prediction's error), the KL measures the prediction's error in goal stds there and ranks actions
    by it (docs/bench_active_inference.md, "The risk
    weighed by what the model can predict": check 2 0.61 -> 0.80 on one model; its goal reaching needs
    ``risk_steps="last"`` and ``goal_motion="any"`` with it); ``"observation"``, AV's instrumental term
    ``||dec(s_t) - o_goal||^2 / (2 obs_std^2)`` in observation space (spec §7, ``instrum_k``; a decode per
    imagined step, so slower); or
    ``"observation_corrected"`` (ours, not in the spec), the same with every decoded prediction corrected by
    the decoder's error on the current observation, ``dec(s_t) + (o_now - dec(E q(s|o_now)))``, as offset-free
    MPC corrects its predictions by the measured output disturbance: what the decoder draws wrong now (a
    blurred static scene) is taken as persisting, so the risk compares predicted changes (check 1's change
    form). Reward tasks always use the log-preference. The observation forms decode every imagined step of
    every candidate: a policy step of the ``realtime`` preset took ~0.74 s on one CPU thread against 22 ms
    with the latent risk (64 x 5 decodes; the ``small`` preset's 3 x 128 x 2 x 5 took ~10 s), so on a CPU
    they are for evaluation (check 2), not for control; batched on a GPU the decodes are one call."""
    risk_steps: Literal["all", "last"] = "all"
    """The latent risks of goal tasks over the plan: ``"all"`` (default), summed over the H imagined steps, as
    the EFE of a policy sums its future steps; ``"last"``, the last imagined step's alone (the spec §7 scorer
    sketch iterates the transition H times and scores ``s'_j`` then, ``risk_k = mean_j -log N(s'_j; mu_g, s_g)``:
    with ``risk="latent_nll"`` this is that sketch read literally). A goal image is a body at rest:
    with a belief that reads the velocity, every step's risk asks the plan to be still on the way, and on
    point_mass the planner crept (docs/bench_active_inference.md, "A goal image asks for rest"), which ``"last"``
    mends. It is not the default because a receding-horizon planner scored at the plan's end alone gains nothing by
    arriving now rather than H steps on: on reacher it hovers short of the goal (success 0.30 -> 0.18, the same
    model and goals; "The sketch's last-step scoring on reacher")."""
    epistemic_weight: float = 1.0
    """Weight of the epistemic term in G (0: the risk-only ablation)."""
    epistemic: Literal["ensemble", "belief_change"] = "ensemble"
    """The epistemic value: ``"ensemble"``, the transition ensemble's disagreement (cheap: every candidate), or
    ``"belief_change"``, AV's ``KL(fuse(p, q(s | dec(s'))) || p)`` of the imagined views (spec §7; a decode and
    an encode per imagined step, so only for the ``epistemic_candidates`` lowest-risk candidates)."""
    epistemic_candidates: int = 64
    """``epistemic="belief_change"``: candidates per env (lowest risk first) whose views are scored; the others
    are screened out (G = inf), as the spec's CPU configuration bounds the cost."""
    gamma: float = 1.0
    """Precision of softmax(-gamma G) when the policy explores."""
    reward_temperature: float = 1.0
    """Reward tasks: log-preferences are ``reward / reward_temperature``."""
    reward_ridge: float = 1e-3
    """Reward tasks: ridge penalty of the readout fitted to the reward examples."""

    def __post_init__(self) -> None:
        if self.obs_type not in OBS_TYPES:
            raise ValueError(f"ActiveInferenceConfig.obs_type must be one of {OBS_TYPES}, got {self.obs_type!r}")
        if (message := decoder_choice_error("ActiveInferenceConfig.decoder", self.decoder)) is not None:
            raise ValueError(message)
        if self.decoder_canvas not in PixelDecoder.CANVAS_CHOICES:
            raise ValueError(f"ActiveInferenceConfig.decoder_canvas must be one of {PixelDecoder.CANVAS_CHOICES}, "
                             f"got {self.decoder_canvas!r}")
        if self.planner not in ("shooting", "cem"):
            raise ValueError(f"ActiveInferenceConfig.planner must be 'shooting' or 'cem', got {self.planner!r}")
        for name in ("frame_stack", "latent_dim", "ensemble_size", "batch_size", "seq_len", "num_candidates",
                     "plan_horizon", "num_samples", "cem_iterations", "num_elites", "transition_layers",
                     "decode_frames", "overshooting"):
            if getattr(self, name) < 1:
                raise ValueError(f"ActiveInferenceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.risk not in RISKS:
            raise ValueError(f"ActiveInferenceConfig.risk must be one of {RISKS}, got {self.risk!r}")
        if self.risk_steps not in ("all", "last"):
            raise ValueError(f"ActiveInferenceConfig.risk_steps must be 'all' or 'last', got {self.risk_steps!r}")
        if self.risk_steps == "last" and self.risk not in LATENT_RISKS:
            raise ValueError(f"ActiveInferenceConfig.risk_steps='last' is for the latent risks, got risk={self.risk!r}")
        if self.goal_motion not in ("still", "any"):
            raise ValueError(f"ActiveInferenceConfig.goal_motion must be 'still' or 'any', got {self.goal_motion!r}")
        if self.goal_motion == "any" and (self.obs_type != "pixels" or self.frame_stack < 2):
            raise ValueError("ActiveInferenceConfig.goal_motion='any' is for stacked pixels (obs_type='pixels', "
                             f"frame_stack >= 2), got obs_type={self.obs_type!r}, frame_stack={self.frame_stack}")
        if self.epistemic not in ("ensemble", "belief_change"):
            raise ValueError(f"ActiveInferenceConfig.epistemic must be 'ensemble' or 'belief_change', got "
                             f"{self.epistemic!r}")
        if self.epistemic_candidates < 1:
            raise ValueError("ActiveInferenceConfig.epistemic_candidates must be >= 1, got "
                             f"{self.epistemic_candidates}")
        if not self.inverse_weight >= 0:
            raise ValueError(f"ActiveInferenceConfig.inverse_weight must be >= 0, got {self.inverse_weight}")
        if self.overshooting > self.seq_len:
            raise ValueError(f"ActiveInferenceConfig.overshooting ({self.overshooting}) needs slices at least as long: "
                             f"seq_len >= overshooting, got seq_len {self.seq_len}")
        if self.num_elites > self.num_candidates:
            raise ValueError(f"num_elites ({self.num_elites}) must be <= num_candidates ({self.num_candidates})")


PRESETS: dict[str, dict[str, Any]] = {
    # The spec's CPU point_mass configuration (§8): K = 1000 random sequences, H = 5, J = 4, argmin.
    "paper": {},
    # Cheaper planning for a 2-core CPU: CEM with fewer candidates (48 ms p50 at batch 1 on one thread,
    # docs/bench_active_inference.md, latency); the planner of the benchmark's goal-reaching runs.
    "small": {"planner": "cem", "num_candidates": 128, "num_elites": 16, "cem_iterations": 3, "num_samples": 2},
    # Fits a 50 Hz control period at batch 1 on one CPU thread (docs/bench_active_inference.md, latency):
    # the spec's random shooting with 64 sequences and one state sample each.
    "realtime": {"planner": "shooting", "num_candidates": 64, "num_samples": 1},
    # Tiny networks for tests.
    "smoke": {"latent_dim": 4, "encoder_depth": 4, "decoder_depth": 4, "hidden_dim": 32, "transition_hidden": 16,
              "ensemble_size": 2, "batch_size": 8, "seq_len": 2, "planner": "cem", "num_candidates": 8,
              "num_elites": 2, "cem_iterations": 2, "plan_horizon": 2, "num_samples": 2},
}

# observations per update whose belief change feeds the motion statistics (goal_motion="any"): two encoder passes
# without gradient each, a small share of the update's own
MOTION_ROWS = 16

# the fields that set planning (what a latency preset changes; the rest shape the networks)
PLANNER_FIELDS = ("planner", "num_candidates", "plan_horizon", "num_samples", "cem_iterations", "num_elites")


# ------------------------------------------------------------------------------------- the scorer


def precision(kl: Tensor | float, a: float = 1.0, b: float = 25.0, c: float = 5.0, d: float = 1.5) -> Tensor:
    """The state-transition precision of Fountas et al. 2020 (DAIMC) eq. 10
    (``shared/algorithms/active_inference.md`` §4, check 5):
    ``omega_t = a / (1 + exp(-(b - D_{t-1}) / c)) + d`` with ``D = KL[Q(a_t) || P(a_t)]``; the
    defaults are their code's values (``a = 1, b = 25, c = 5, d = 1.5``, so ``omega`` lies in
    ``(d, a + d) = (1.5, 2.5)``). The transition is then ``N(mu, sigma^2 / omega)``. Elementwise over
    ``kl``; returns a float tensor.
    """
    kl = torch.as_tensor(kl, dtype=torch.float32)
    return a * torch.sigmoid((b - kl) / c) + d



def nll_risk(mean: Tensor, std: Tensor, goal_mean: Tensor, goal_std: Tensor) -> Tensor:
    """``risk="latent_nll"``, the spec §7 scorer's FER form: the expected negative log-probability of the predicted
    state under the preferred-state belief, ``E_{s ~ N(mean, std^2)}[-log N(s; goal_mean, goal_std^2)]``, summed over
    the last dim. In closed form, ``sum_d ((mean_d - mu_g,d)^2 + std_d^2) / (2 s_g,d^2) + log s_g,d + log(2 pi) / 2``:
    what ``mean_j -log N(s'_j; mu_g, s_g)`` over samples ``s'_j`` of the step's Gaussian averages to (the rollout
    samples the states between steps), without the samples' noise. It is ``KL(N(mean, std) || N(mu_g, s_g))`` plus
    the prediction's entropy."""
    return -gaussian_log_prob(mean, goal_mean, goal_std) + 0.5 * (std / goal_std).square().sum(-1)


def overlap_risk(mean: Tensor, std: Tensor, goal_mean: Tensor, goal_std: Tensor) -> Tensor:
    """``risk="latent_overlap"``: ``-log N(goal_mean; mean, std^2 + goal_std^2)`` summed over the last dim, minus the
    log of the overlap ``int N(s; mean, std^2) N(s; goal_mean, goal_std^2) ds`` of predicted and preferred state."""
    return -gaussian_log_prob(goal_mean, mean, (std.square() + goal_std.square()).sqrt())


def expected_free_energy(rollout: TensorDict, goal_mean: Tensor | None, goal_std: Tensor | None, *,
                         ambiguity: float = 0.0, epistemic_weight: float = 1.0, risk_steps: str = "all",
                         risk_form: str = "latent") -> TensorDict:
    """The expected free energy of imagined rollouts, term by term.

    ``rollout``: a TensorDict ``[M, H]`` of predicted Gaussians (``mean``, ``std`` ``[M, H, D]``) and
    their ``epistemic`` value ``[M, H]`` (what ``world_model.imagine`` returns). ``goal_mean`` and
    ``goal_std`` ``[M, D]`` (or broadcastable, e.g. ``[D]``) are the preferred-state distribution
    p~(s); ``None``: no preference (risk 0). ``ambiguity`` is ``E[H p(o|s)]`` per step (a constant
    for a fixed-variance decoder).

    Returns a TensorDict ``[M]`` of the terms summed over the horizon: ``risk`` =
    ``sum_t KL(N(mean_t, std_t) || p~)``, ``ambiguity`` = ``H * ambiguity``, ``epistemic`` =
    ``sum_t epistemic_t``, and ``G = risk + ambiguity - epistemic_weight * epistemic``. With
    ``risk_steps="last"`` the risk is the last step's alone, ``KL(N(mean_H, std_H) || p~)``
    (``ActiveInferenceConfig.risk_steps``). With ``risk_form="latent_nll"`` each step's risk is the expected
    ``-log N(s_t; goal_mean, goal_std)`` under ``N(mean_t, std_t)`` (:func:`nll_risk`), with
    ``risk_form="latent_overlap"`` ``-log N(goal_mean; mean_t, std_t^2 + goal_std^2)``, instead of the KL
    (``ActiveInferenceConfig.risk``).
    """
    mean, std, epistemic = rollout["mean"], rollout["std"], rollout["epistemic"]
    m, h = mean.shape[:2]
    if goal_mean is None:
        risk = torch.zeros(m, device=mean.device)
    else:
        goal_mean = goal_mean.expand(m, -1).unsqueeze(1) if goal_mean.dim() <= 2 else goal_mean
        goal_std = goal_std.expand(m, -1).unsqueeze(1) if goal_std.dim() <= 2 else goal_std
        if risk_form == "latent_overlap":
            risk = overlap_risk(mean, std, goal_mean, goal_std)  # [M, H]
        elif risk_form == "latent_nll":
            risk = nll_risk(mean, std, goal_mean, goal_std)  # [M, H]
        elif risk_form == "latent":
            risk = gaussian_kl(mean, std, goal_mean, goal_std)  # [M, H]
        else:
            raise ValueError(f"risk_form must be one of {LATENT_RISKS}, got {risk_form!r}")
        risk = risk[:, -1] if risk_steps == "last" else risk.sum(-1)
    amb = torch.full((m,), float(ambiguity) * h, device=mean.device)
    epi = epistemic.sum(-1)
    return TensorDict({"risk": risk, "ambiguity": amb, "epistemic": epi,
                       "G": risk + amb - float(epistemic_weight) * epi}, batch_size=[m])


# ------------------------------------------------------------------------------------- the planner


def plan_value(terms: TensorDict, epistemic_weight: float) -> Tensor:
    """What the planner minimises over candidates: ``G`` without its ambiguity, ``risk - epistemic_weight *
    epistemic``, and inf for the candidates the ``belief_change`` term screened out. The ambiguity is the same
    for every candidate (fixed-variance decoder) and ~1e4 nats, so adding it in float32 rounds away the
    differences an argmin has to see; the order is G's otherwise. ``terms``: what ``ActiveInferencePolicy.score``
    returns (``screened`` optional)."""
    value = terms["risk"] - epistemic_weight * terms["epistemic"]
    if "screened" in terms.keys():
        value = value.masked_fill(terms["screened"] > 0, float("inf"))
    return value


def plan(score: Callable[[Tensor], Tensor], batch_size: int, horizon: int, action_dim: int, *,
         num_candidates: int, method: str = "cem", iterations: int = 3, num_elites: int = 64,
         device: torch.device | str = "cpu", generator: torch.Generator | None = None,
         select: Callable[[Tensor], Tensor] | None = None,
         draw: Callable[[str, tuple[int, ...]], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Minimise ``score`` over action sequences in [-1, 1], batched over ``batch_size`` problems.

    ``score(actions [N, K, H, A]) -> G [N, K]``. ``method="shooting"``: one round of ``K`` uniform
    candidates. ``method="cem"``: ``iterations`` rounds of ``K`` candidates from ``N(mu, sigma)``
    (clamped to [-1, 1]; round 1 uses mu = 0, sigma = 1), refitted to the ``num_elites`` lowest scores.
    Returns the best sequence seen ``[N, H, A]`` and its score ``[N]``; with ``select`` (``G [N, K]``
    -> indices ``[N]``, e.g. a softmax(-gamma G) draw) the final round's candidate it picks instead.
    The budget is ``K * iterations`` scored sequences (``K`` for shooting). ``draw(kind, shape)``
    (``kind`` ``"rand"`` or ``"randn"``) replaces the candidates' random draws (default: torch's,
    with ``generator``).
    """
    n, k = int(batch_size), int(num_candidates)
    shape = (n, k, horizon, action_dim)
    rounds = 1 if method == "shooting" else int(iterations)
    if method not in ("shooting", "cem"):
        raise ValueError(f"plan: method must be 'shooting' or 'cem', got {method!r}")
    mu = torch.zeros(n, 1, horizon, action_dim, device=device)
    sigma = torch.ones_like(mu)
    best_actions = torch.zeros(n, horizon, action_dim, device=device)
    best_score = torch.full((n,), float("inf"), device=device)
    rows = torch.arange(n, device=device)
    for _ in range(rounds):
        kind = "rand" if method == "shooting" else "randn"
        if draw is not None:
            noise = draw(kind, shape)
        else:
            noise = getattr(torch, kind)(shape, generator=generator).to(device)
        noise = noise * 2 - 1 if method == "shooting" else noise
        actions = noise if method == "shooting" else (mu + sigma * noise).clamp(-1.0, 1.0)
        g = score(actions)
        idx = g.argmin(dim=1)
        better = g[rows, idx] < best_score
        best_score = torch.where(better, g[rows, idx], best_score)
        best_actions = torch.where(better.reshape(-1, 1, 1), actions[rows, idx], best_actions)
        if method == "cem":
            elites = actions.gather(1, g.topk(num_elites, dim=1, largest=False).indices
                                    .reshape(n, -1, 1, 1).expand(-1, -1, horizon, action_dim))
            mu = elites.mean(dim=1, keepdim=True)
            sigma = elites.std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-3) if num_elites > 1 \
                else torch.full_like(mu, 0.1)
    if select is not None:
        pick = select(g)
        return actions[rows, pick], g[rows, pick]
    return best_actions, best_score


# ------------------------------------------------------------------------------------------- policy


EFE_TERMS = ("G", "risk", "ambiguity", "epistemic")


class ActiveInferencePolicy(Policy):
    """Model-predictive control by expected free energy; see the module docstring.

    ``goal`` ``[1 or N, 2D]`` holds the preferred-state distribution ``[mean ‖ std]``, and ``goal_obs``
    ``[1 or N, *obs_shape]`` the goal observation in the decoder's scale (what the observation risks,
    ``config.risk="observation"`` or ``"observation_corrected"``, compare the decoded predictions with; required
    by them); ``reward``
    ``[1, F + 1]`` a reward readout ``[w ‖ b]`` on ``reward_features`` (the reward head's hidden
    layers); neither: exploration by the epistemic term only. The carry holds ``mean``, ``std`` (the
    belief q(s_t|o_t)), ``prev_action``, the planner's per-env ``seed``, the frame stack, and the executed
    plan's expected free energy term by term (``efe_G``, ``efe_risk``, ``efe_ambiguity``,
    ``efe_epistemic`` ``[N]``: :func:`expected_free_energy` of the whole chosen sequence).
    """

    def __init__(self, world_model: ActiveInferenceModel, config: ActiveInferenceConfig, *,
                 goal: Tensor | None = None, goal_obs: Tensor | None = None, reward: Tensor | None = None,
                 reward_features: nn.Module | None = None, explore: bool = False):
        super().__init__(world_model.obs_key, world_model.obs_shape, world_model.action_dim,
                         frame_stack=world_model.frame_stack, explore=explore)
        if goal is not None and reward is not None:
            raise ValueError("an active inference policy takes a goal or a reward preference, not both")
        if reward is not None and reward_features is None:
            raise ValueError("a reward preference needs the reward head's features (reward_features)")
        self.world_model = world_model
        self.reward_features = reward_features if reward is not None else None
        self.register_buffer("reward", None if reward is None else reward.detach().to(self.device, torch.float32)
                             .reshape(1, -1))
        self.config = config
        if goal is not None:
            goal = goal.detach().to(self.device, torch.float32)
            goal = goal.reshape(1, -1) if goal.dim() == 1 else goal
            if goal.shape[-1] != 2 * world_model.latent_dim:
                raise ValueError(f"a goal preference is [mean ‖ std] with {2 * world_model.latent_dim} values, "
                                 f"got shape {list(goal.shape)}")
        self.register_buffer("goal", goal)
        if config.risk not in LATENT_RISKS and goal is not None:
            if goal_obs is None:
                raise ValueError(f"risk={config.risk!r} compares predictions with the goal observation: pass "
                                 "goal_obs (agent.policy(task) reads it from task.goal)")
            goal_obs = goal_obs.detach().to(self.device, torch.float32)
            goal_obs = goal_obs.unsqueeze(0) if goal_obs.dim() == len(world_model.obs_shape) else goal_obs
            shape = ", ".join(map(str, world_model.obs_shape))
            if tuple(goal_obs.shape[1:]) != tuple(world_model.obs_shape) or goal_obs.shape[0] not in (1, goal.shape[0]):
                raise ValueError(f"goal_obs must be [1 or {goal.shape[0]}, {shape}], got {list(goal_obs.shape)}")
        else:
            goal_obs = None
        self.register_buffer("goal_obs", goal_obs)

    def init_carry(self, batch_size: int) -> TensorDict:
        carry = super().init_carry(batch_size)
        state = self.world_model.initial_state(batch_size)
        carry["mean"], carry["std"] = state["mean"], state["std"]
        carry["prev_action"] = torch.zeros(batch_size, self.action_dim, device=self.device)
        carry["seed"] = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        # the executed plan's expected free energy, term by term (diagnostics; spec §9 "Logging")
        for term in EFE_TERMS:
            carry[f"efe_{term}"] = torch.zeros(batch_size, device=self.device)
        return carry

    def start_episode(self, batch_size: int) -> TensorDict:
        """A fresh carry whose planning seed is drawn from torch's random state (per episode)."""
        carry = self.init_carry(batch_size)
        carry["seed"] = torch.randint(0, 2**62, (batch_size,), dtype=torch.int64).to(self.device)
        return carry

    def _goal(self, n: int) -> tuple[Tensor | None, Tensor | None]:
        if self.goal is None:
            return None, None
        goal = self.goal.expand(n, -1) if self.goal.shape[0] == 1 else self.goal
        if goal.shape[0] != n:
            raise ValueError(f"the goal task holds {goal.shape[0]} goals but the observation has {n} envs")
        return goal.chunk(2, dim=-1)

    def score(self, state: TensorDict, actions: Tensor, goal_mean: Tensor | None,
              goal_std: Tensor | None, gens: list[torch.Generator] | None = None,
              context: Tensor | None = None, draws: dict[str, Tensor] | None = None,
              current: Tensor | None = None) -> TensorDict:
        """EFE terms ``[N, K]`` of candidates ``actions`` ``[N, K, H, A]`` from beliefs ``state`` ``[N]``.
        The rollouts' random draws are ``draws`` (:meth:`draw_noise`, shared by the K candidates), else drawn
        from ``gens`` (one generator per env) or torch's random state. ``context`` ``[N, 3 (k - 1), H, W]``:
        the newest observed frames, which the first imagined views are stacked with (``belief_change``).
        ``screened`` is 1 for candidates left out of the ``belief_change`` term (their ``G`` is inf).
        ``current`` ``[N, *obs_shape]``: the current observation in the decoder's scale (``world_model.target``),
        which ``risk="observation_corrected"`` needs."""
        cfg, wm = self.config, self.world_model
        n, k, h = actions.shape[:3]
        j = cfg.num_samples
        start = state.repeat_interleave(k, dim=0)
        draws = self.draw_noise(n, h, gens) if draws is None else draws
        rollout = wm.imagine(start, actions.flatten(0, 1), num_samples=j,
                             noise=self.common_noise(draws, k))  # [N*K*J, H]
        observation_risk = self.goal_obs is not None and goal_mean is not None
        if goal_mean is not None and not observation_risk:
            goal_mean = goal_mean.repeat_interleave(k * j, dim=0)
            goal_std = goal_std.repeat_interleave(k * j, dim=0)
        terms = expected_free_energy(rollout, None if observation_risk else goal_mean, goal_std,
                                     ambiguity=wm.ambiguity(), epistemic_weight=cfg.epistemic_weight,
                                     risk_steps=cfg.risk_steps,
                                     risk_form=cfg.risk if cfg.risk in LATENT_RISKS else "latent")
        if observation_risk:  # AV's instrumental term: the decoded predictions against the goal observation
            rows = torch.arange(n, device=actions.device) if self.goal_obs.shape[0] > 1 \
                else torch.zeros(n, dtype=torch.int64, device=actions.device)
            goal_obs = self.goal_obs
            if cfg.risk == "observation_corrected":  # dec(s') + (o_now - dec(s_now)) vs o_goal, per env
                if current is None:
                    raise ValueError("risk='observation_corrected' needs the current observation (current=)")
                goal_obs = goal_obs[rows] - current.reshape(n, *wm.obs_shape) + wm.decode_mean(state["mean"])
                rows = torch.arange(n, device=actions.device)
            risk = wm.observation_risk(rollout["mean"], goal_obs, rows.repeat_interleave(k * j)).sum(-1)
            terms["G"] = terms["G"] + risk
            terms["risk"] = risk
        if self.reward is not None:  # risk = -expected log-preference, at each step's predicted mean
            w, b = self.reward[0, :-1], self.reward[0, -1]
            log_pref = (self.reward_features(rollout["mean"]) @ w + b).sum(-1) / cfg.reward_temperature
            terms["G"] = terms["G"] - terms["risk"] - log_pref
            terms["risk"] = -log_pref
        terms["screened"] = torch.zeros_like(terms["risk"])
        if cfg.epistemic == "belief_change":
            terms = self._belief_change(terms, rollout, (n, k, j), context)
        return terms.reshape(n, k, j).mean(-1)

    def draw_noise(self, n: int, h: int, gens: list[torch.Generator] | None = None) -> dict[str, Tensor]:
        """The random draws of ``J = num_samples`` imagined ``h``-step rollouts in each of ``n`` envs: ``eps``
        ``[N, J, H, D]`` (standard normal) and ``member`` ``[N, J, H]``, from ``gens`` (one per env) or torch's
        random state. :meth:`common_noise` shares them among an env's candidates."""
        wm, j, d = self.world_model, self.config.num_samples, self.world_model.latent_dim
        members = len(wm.transitions)
        if gens is not None:
            return {"eps": self._draw(gens, "randn", (n, j, h, d)),
                    "member": torch.stack([torch.randint(members, (j, h), generator=g) for g in gens])
                    .to(self.device)}
        return {"eps": torch.randn(n, j, h, d, device=self.device),
                "member": torch.randint(members, (n, j, h), device=self.device)}

    @staticmethod
    def common_noise(draws: dict[str, Tensor], k: int) -> dict[str, Tensor]:
        """:meth:`ActiveInferenceModel.imagine`'s ``noise`` for ``k`` candidates per env from per-env
        ``draws`` (:meth:`draw_noise`): ``eps`` ``[N*K*J, H, D]``, ``member`` ``[N*K*J, H]``.

        Common random numbers: an env's J belief samples and transition draws (s_j ~ q_now, the ensemble member
        and the p(s'|s, a) noise per step) are the same for all of its K candidates, as in the spec's s_j
        (j = 1..J, not per k), so candidates differ by their actions only. Drawn per candidate, the noise of
        J = 1-4 samples outweighs what one action changes and the argmin picks the luckiest draw."""
        eps, member = draws["eps"], draws["member"]
        n, j, h, d = eps.shape
        return {"eps": eps.unsqueeze(1).expand(n, k, j, h, d).reshape(n * k * j, h, d),
                "member": member.unsqueeze(1).expand(n, k, j, h).reshape(n * k * j, h)}

    def _belief_change(self, terms: TensorDict, rollout: TensorDict, sizes: tuple[int, int, int],
                       context: Tensor | None) -> TensorDict:
        """Replace the ensemble's epistemic value with AV's belief change for the ``epistemic_candidates``
        lowest-risk candidates of each env; screen the others out (``G`` = inf)."""
        cfg, wm = self.config, self.world_model
        n, k, j = sizes
        c = min(cfg.epistemic_candidates, k)
        risk = terms["risk"].reshape(n, k, j).mean(-1)
        top = risk.topk(c, dim=1, largest=False).indices  # [N, c]
        cand = torch.arange(n, device=risk.device)[:, None] * k + top
        rows = (cand[..., None] * j + torch.arange(j, device=risk.device)).reshape(-1)  # into the N*K*J rollouts
        picked = rollout[rows]
        if context is not None:
            context = context.repeat_interleave(c * j, dim=0)
        epistemic = torch.zeros_like(terms["epistemic"])
        epistemic[rows] = wm.view_epistemic(picked["mean"], picked["std"], context).sum(-1)
        screened = torch.ones_like(epistemic)
        screened[rows] = 0.0
        terms = terms.clone(False)
        terms["epistemic"], terms["screened"] = epistemic, screened
        g = terms["risk"] + terms["ambiguity"] - cfg.epistemic_weight * epistemic
        terms["G"] = g.masked_fill(screened > 0, float("inf"))
        return terms

    def _draw(self, gens: list[torch.Generator], kind: str, shape: tuple[int, ...]) -> Tensor:
        """``[N, *shape[1:]]``: row ``i`` drawn from ``gens[i]`` (``kind``: ``"rand"`` or ``"randn"``)."""
        fn = getattr(torch, kind)
        return torch.stack([fn(tuple(shape[1:]), generator=g) for g in gens]).to(self.device)

    def act(self, x: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        """Observe, plan (every env in one batch), execute the plan's first action. All of a row's random
        draws come from a generator seeded by its carry's ``seed``, so one env's action never depends on
        the other envs; the next seed is drawn from the same generator."""
        cfg, wm = self.config, self.world_model
        n = x.shape[0]
        state = wm.observe(wm.initial_state(n), x, carry["prev_action"], is_first)
        goal_mean, goal_std = self._goal(n)
        gens = [torch.Generator().manual_seed(int(seed)) for seed in carry["seed"].tolist()]
        k = self.frame_stack
        context = x[:, -3 * (k - 1):] if self.obs_key == "pixels" and k > 1 else None  # the newest k-1 frames
        current = wm.target(x) if self.goal_obs is not None and cfg.risk == "observation_corrected" else None
        select = None
        if self.explore:
            def select(g: Tensor) -> Tensor:
                probs = torch.softmax(-cfg.gamma * g, dim=-1).cpu()
                return torch.stack([torch.multinomial(p, 1, generator=gen)[0] for p, gen in zip(probs, gens,
                                                                                                 strict=True)]
                                   ).to(g.device)
        # one set of draws for the whole planning step: every CEM round and the executed plan's terms below use
        # them, so a round's candidates are compared with the best of earlier rounds under the same noise
        draws = self.draw_noise(n, cfg.plan_horizon, gens)

        def rank(a: Tensor) -> Tensor:
            terms = self.score(state, a, goal_mean, goal_std, context=context, draws=draws, current=current)
            return plan_value(terms, cfg.epistemic_weight)

        actions, _ = plan(rank, n, cfg.plan_horizon,
                          self.action_dim, num_candidates=cfg.num_candidates, method=cfg.planner,
                          iterations=cfg.cem_iterations, num_elites=cfg.num_elites, device=x.device, select=select,
                          draw=lambda kind, shape: self._draw(gens, kind, shape))
        action = actions[:, 0].clamp(-1.0, 1.0)
        chosen = self.score(state, actions.unsqueeze(1), goal_mean, goal_std, context=context, draws=draws,
                            current=current)[:, 0]
        carry = carry.clone(False)
        for term in EFE_TERMS:
            carry[f"efe_{term}"] = chosen[term]
        carry["mean"], carry["std"], carry["prev_action"] = state["mean"], state["std"], action.clone()
        carry["seed"] = torch.stack([torch.randint(0, 2**62, (), generator=g) for g in gens]).to(self.device)
        return action, carry


# -------------------------------------------------------------------------------------------- agent


class ActiveInferenceAgent(Agent):
    """The deep active inference agent; build it with :meth:`from_env` or ``make_agent("active_inference", env)``."""

    name = "active_inference"
    config_class = ActiveInferenceConfig
    presets = PRESETS
    inference_modules = ("world_model", "reward_head")

    def __init__(self, config: ActiveInferenceConfig, obs_shape: tuple[int, ...], action_dim: int,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.config = cfg = config
        self.device = resolve_device(device)
        self.obs_shape = check_obs_shape(cfg.obs_type, obs_shape)
        self.action_dim = int(action_dim)
        self.env_steps = 0
        self.obs_key = cfg.obs_type
        self.world_model = ActiveInferenceModel(
            cfg.obs_type, self.obs_shape, self.action_dim, latent_dim=cfg.latent_dim, frame_stack=cfg.frame_stack,
            encoder_depth=cfg.encoder_depth, hidden_dim=cfg.hidden_dim, transition_hidden=cfg.transition_hidden,
            transition_layers=cfg.transition_layers, ensemble_size=cfg.ensemble_size,
            decoder_depth=cfg.decoder_depth, decoder=cfg.decoder, decoder_canvas=cfg.decoder_canvas,
            obs_std=cfg.obs_std, min_std=cfg.min_std, prior_min_std=cfg.prior_min_std,
            kl_transition_weight=cfg.kl_transition_weight,
            kl_prior_weight=cfg.kl_prior_weight, free_nats=cfg.free_nats, decode_frames=cfg.decode_frames,
            overshooting=cfg.overshooting, inverse_weight=cfg.inverse_weight, frame_difference=cfg.frame_difference,
            motion_statistics=cfg.goal_motion == "any")
        self.reward_head = mlp(cfg.latent_dim, [cfg.transition_hidden], 1)
        self.to(self.device)
        self._optimizer = make_adam([*self.world_model.parameters(), *self.reward_head.parameters()],
                                    lr=cfg.lr, max_grad_norm=cfg.max_grad_norm)

    @property
    def frame_stack(self) -> int:
        return self.config.frame_stack if self.config.obs_type == "pixels" else 1

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(batch_size=self.config.batch_size, frame_stack=self.frame_stack,
                          horizon=self.config.seq_len, keys=(self.obs_key,))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self._optimizer}

    # ---------------------------------------------------------------------------------- tasks
    def policy(self, task: Task | None = None, *, explore: bool = False) -> ActiveInferencePolicy:
        goal = reward = None
        if task is not None:
            kind = task.info.get("kind")
            if kind not in ("goal", "reward") or task.z is None:
                raise UnsupportedTaskError("the active inference policy takes a goal or reward task "
                                           "(agent.infer_task(GoalObservation | RewardSamples)) or none (exploration)")
            goal, reward = (task.z, None) if kind == "goal" else (None, task.z)
        goal_obs = None
        if goal is not None and self.config.risk not in LATENT_RISKS:
            if task.goal is None or self.obs_key not in task.goal.keys():
                raise ValueError(f"risk={self.config.risk!r} needs the goal observation: a Task from infer_task("
                                 f"GoalObservation) with task.goal[{self.obs_key!r}] (this task has none)")
            goal_obs = self.world_model.target(task.goal[self.obs_key].to(self.device))
            goal_obs = goal_obs.reshape(-1, *self.world_model.obs_shape)
        return ActiveInferencePolicy(self.world_model, self.config, goal=goal, goal_obs=goal_obs, reward=reward,
                                     reward_features=self.reward_features, explore=explore)

    @property
    def reward_features(self) -> nn.Module:
        """The reward head's hidden layers ``phi(s)`` ``[*, F]`` (its last layer is the trained readout)."""
        return self.reward_head[:-1]

    @torch.no_grad()
    def infer_task(self, spec: RewardSamples | GoalObservation) -> Task:
        """A goal observation -> ``Task(z=[mean ‖ std] of q(s|o_goal))`` ``[N, 2D]``. One goal frame
        ``[N, 3, H, W]`` is tiled ``frame_stack`` times (a still goal); a stacked one is used as is."""
        if isinstance(spec, RewardSamples):
            return self._infer_reward(spec)
        if not isinstance(spec, GoalObservation):
            raise UnsupportedTaskError(f"active_inference infers goal tasks only, got {type(spec).__name__}")
        key = self.obs_key
        if key not in spec.obs.keys():
            raise KeyError(f"active_inference (obs_type={key!r}) needs the goal observation to hold {key!r}; "
                           f"it has keys {sorted(map(str, spec.obs.keys()))}")
        x = spec.obs[key]
        if key == "pixels":
            channels, stacked = x.shape[-3], 3 * self.frame_stack
            if channels == 3 and stacked != 3:
                x = x.repeat(*([1] * (x.dim() - 3)), self.frame_stack, 1, 1)
            elif channels != stacked:
                raise ValueError(f"goal pixels must have 3 or {stacked} channels, got {channels}")
            x = x.reshape(-1, *x.shape[-3:])
        else:
            x = x.reshape(-1, x.shape[-1])
        mean, std = self.world_model.posterior(x.to(self.device))
        if key == "pixels" and channels == 3 and self.config.goal_motion == "any":  # a single frame: the place alone
            mean, std = self.world_model.motion.widen(mean, std)
        return Task(z=torch.cat([mean, std], dim=-1), goal=spec.obs.select(key).clone(), info={"kind": "goal"})

    def _infer_reward(self, spec: RewardSamples) -> Task:
        """Ridge regression of the examples' rewards on ``phi(mean of q(s|o))``: ``Task(z=[w ‖ b])``."""
        key = self.obs_key
        if key not in spec.obs.keys():
            raise KeyError(f"active_inference (obs_type={key!r}) needs the reward samples to hold {key!r}")
        x = spec.obs[key]
        x = x.reshape(-1, *x.shape[-(3 if key == "pixels" else 1):]).to(self.device)
        reward = spec.reward.reshape(-1).to(self.device, torch.float32)
        if reward.shape[0] != x.shape[0] or not bool(torch.isfinite(reward).all()):
            raise ValueError(f"reward samples need one finite reward per observation, got {list(spec.reward.shape)} "
                             f"for {x.shape[0]} observations")
        phi = self.reward_features(self.world_model.posterior(x)[0])
        phi = torch.cat([phi, torch.ones_like(phi[:, :1])], dim=-1).double()
        eye = torch.eye(phi.shape[1], dtype=phi.dtype, device=phi.device) * self.config.reward_ridge * phi.shape[0]
        z = torch.linalg.solve(phi.T @ phi + eye, phi.T @ reward.double())
        return Task(z=z.float().reshape(1, -1), info={"kind": "reward"})

    # --------------------------------------------------------------------------------- update
    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        terms, objective = self._objective_terms(batch)
        self._optimizer.zero_grad(set_to_none=True)
        sum(objective.values()).backward()
        # each part's gradient norm (before clipping): where a burst of the global norm comes from
        parts = self.parameter_groups()
        groups = {f"grad_norm_{name}": torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                  for name, params in parts.items()}
        before = {name: [p.detach().clone() for p in params] for name, params in parts.items()}
        self._optimizer.step()
        # each part's step (the norm of its parameters' change): with the clip scaling every gradient alike, Adam's
        # steps show a run-away before the norms do (docs/bench_active_inference.md, "The free-energy spike traced")
        steps = {f"step_{name}": torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(params, before[name],
                                                                                                strict=True)])
                 for name, params in parts.items()}
        metrics = {**{k: terms[k] for k in LOSS_METRICS},
                   "reward_loss": objective["reward"], **groups, **steps}
        grad_norm = last_grad_norm(self._optimizer)
        if grad_norm is not None:  # before clipping (max_grad_norm): spikes of the free energy show here first
            metrics["grad_norm"] = grad_norm
        if self.world_model.motion is not None:  # goal_motion="any": what motion does to the belief, as trained now
            x = batch[self.obs_key]
            self.world_model.track_motion(x.reshape(-1, *x.shape[batch.batch_dims:])[:MOTION_ROWS].to(self.device))
        return scalar_metrics({k: v.detach() for k, v in metrics.items()}, self.device)  # no host sync per update

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trained parameters by part (every parameter of the optimizer in exactly one): ``encoder`` (the
        pixel or state trunk), ``posterior`` (q(s|o)'s head), ``transition`` (the ensemble), ``decoder`` and
        ``reward`` (the reward head), and ``inverse`` (the inverse-dynamics head) when ``inverse_weight > 0``."""
        wm = self.world_model
        groups = {"encoder": list(wm.encoder.parameters()), "posterior": list(wm.posterior_head.parameters()),
                  "transition": list(wm.transitions.parameters()), "decoder": list(wm.decoder.parameters()),
                  "reward": list(self.reward_head.parameters())}
        if wm.inverse_head is not None:
            groups["inverse"] = list(wm.inverse_head.parameters())
        return groups

    def gradient_norms_by_term(self, batch: TensorDict) -> dict[str, dict[str, float]]:
        """Each objective term's gradient norm on each part (:meth:`parameter_groups`, and ``"all"``) for the
        batch, as :meth:`update` would compute it from the current parameters and torch's RNG state, and under
        ``"total"`` the norms of their sum (the update's gradient). Changes nothing (no ``.grad``, no step). For
        tracing a gradient burst: set the parameters and RNG state of the update that burst
        (``bench_active_inference.py --burst-dump`` does)."""
        _, objective = self._objective_terms(batch)
        groups = self.parameter_groups()
        params = [p for ps in groups.values() for p in ps]

        def norms(grads: list[Tensor]) -> dict[str, float]:
            out, i = {}, 0
            for group, ps in groups.items():
                out[group] = float(torch.nn.utils.get_total_norm(grads[i:i + len(ps)]))
                i += len(ps)
            return {**out, "all": float(torch.nn.utils.get_total_norm(grads))}

        out: dict[str, dict[str, float]] = {}
        total = [torch.zeros_like(p) for p in params]
        for name, term in objective.items():
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True) \
                if term.requires_grad else [None] * len(params)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            for t, g in zip(total, grads, strict=True):
                t.add_(g)
            out[name] = norms(grads)
        out["total"] = norms(total)  # the sum of the terms' gradients: the update's own
        return out

    def _objective_terms(self, batch: TensorDict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The world model's loss terms and the objective's summands (the model's weighted terms and the reward
        head's squared error, ``reward``), all with their graphs."""
        batch = batch.to(self.device)
        terms = self.world_model.loss_terms(batch)
        reward_loss = torch.zeros((), device=self.device)
        if ("next", "reward") in batch.keys(True):
            # the mean over the rows with a reward (NaN marks reward-free steps), masked rather than selected so
            # that no host read decides anything; a batch without any reward gives the head a zero gradient.
            # Data-parallel: over the global batch (gathered with gradient, as the transition KL), so the mean
            # divides by every rank's count of rewarded rows.
            reward = batch["next", "reward"].float().reshape(-1)
            finite = torch.isfinite(reward)
            x_next = batch["next", self.obs_key]
            with torch.no_grad():
                s = self.world_model.posterior(x_next.reshape(-1, *x_next.shape[batch.batch_dims:]))[0]
            pred = self.reward_head(s).reshape(-1)
            error = torch.where(finite, pred - torch.nan_to_num(reward), 0.0)
            squared = gather_batch(error.square(), grad=True)
            reward_loss = squared.sum() / gather_batch(finite).sum().clamp_min(1)
        return terms, {**terms["objective"], "reward": reward_loss}

    def extra_state(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state.get("env_steps", 0))
