#!/usr/bin/env python
"""Small-scale benchmark of the deep active inference agent (issue 14; spec
``shared/algorithms/active_inference.md`` §8 and §10 checks 1-3) on point_mass-easy, 64x64 pixels.

    python scripts/bench_active_inference.py                 # the default run (~15 min on 2 CPU cores)
    python scripts/bench_active_inference.py --quick        # seconds; writes under the temp dir, never docs/

1. Collects ``--train-episodes`` uniform-random-action episodes (``--episode-length`` steps, action
   repeat 4) into a ``ReplayBuffer``, and ``--heldout-episodes`` more (another seed) for testing.
2. Trains the agent's world model by ``agent.update(buffer.sample(**agent.sample_spec().sample_kwargs()))``
   for ``--updates`` updates or ``--train-seconds`` seconds, whichever comes first, logging the free energy.
3. On the held-out episodes:
   - check 1: the one-step prediction MSE of ``decode(E[p(s'|s,a)])`` (the ensemble members' mean from
     the posterior mean of o_t) against the copy-current-frame baseline, per pixel in ``x / 255 - 0.5``
     units; and whether the smoothed free-energy curve decreases. Also the model's predicted change applied to
     the frame, o_t + decode(s') - decode(s), beside the same change under the zero action and another case's
     action (see ``one_step_mse``);
   - check 2: for ``--rank-cases`` held-out (o_t, a_t, o_{t+1}) with the goal set to o_{t+1}, the rank
     of the true a_t among ``--rank-candidates`` uniform random one-step candidates by the agent's G
     (``ActiveInferencePolicy.score``, i.e. ``expected_free_energy`` on imagined one-step outcomes), and on
     the same cases and draws by G under the other risk forms of ``--rank-risks`` (the observation-space
     risk, AV's ``||dec(s') - o_goal||^2``, decodes every candidate); target: in the best 20% in >= 80% of cases;
   - check 3: goal reaching from ``--goals`` goal images (physics states sampled from the held-out
     data, rendered with ``env.set_physics_state``) in ``--goal-steps`` steps, with the agent's
     policy vs uniform-random and zero-action policies: success (final distance < ``--success-radius``)
     and mean final distance. Target: success >= both baselines + 20 points, lower mean distance.

Writes a markdown report to ``--out``, ``results.json``, ``free_energy.png`` and ``imagined.png`` (real
vs open-loop imagined frames of one held-out sequence) under ``--fig-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor

from latentrl.agents.active_inference import (
    EFE_TERMS,
    PLANNER_FIELDS,
    PRESETS,
    RISKS,
    ActiveInferenceAgent,
    ActiveInferencePolicy,
    plan_value,
)
from latentrl.agents.base import GoalObservation, Policy, UniformRandomPolicy
from latentrl.control.telemetry import step_latencies
from latentrl.envs import get_task, make_env
from latentrl.replay import ReplayBuffer
from latentrl.training.checkpoint import capture_rng, load_plain, restore_rng, save_atomic
from latentrl.training.cli import ConfigError, typed_config_overrides
from latentrl.training.logger import machine_description, processor_name, write_report_page
from latentrl.world_models.layers import gaussian_kl

ROOT = Path(__file__).resolve().parents[1]
CHECK3_MARGIN = 0.2  # check 3: the agent's success at least this far above both baselines (spec section 10)


class ZeroPolicy(Policy):
    """The zero action at every step (the 'stay' baseline of goal reaching)."""

    def __init__(self, action_dim: int):
        super().__init__(None, (), action_dim, explore=False)

    def act(self, x, carry, is_first):
        return torch.zeros(carry.batch_size[0], self.action_dim), carry


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", default="point_mass-easy")
    p.add_argument("--preset", default="small", help="ActiveInferenceConfig preset (paper / small / smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an ActiveInferenceConfig field of the preset (repeatable), e.g. --set obs_std=0.1")
    p.add_argument("--train-episodes", type=int, default=40)
    p.add_argument("--heldout-episodes", type=int, default=10)
    p.add_argument("--episode-length", type=int, default=100, help="agent steps per collected episode")
    p.add_argument("--action-repeat", type=int, default=4)
    p.add_argument("--num-envs", type=int, default=10, help="envs stepped side by side while collecting")
    p.add_argument("--updates", type=int, default=20000, help="most world-model updates")
    p.add_argument("--train-seconds", type=float, default=540.0, help="most seconds of training")
    p.add_argument("--log-every", type=int, default=10, help="keep the free energy every N updates")
    p.add_argument("--burst-dump", default=None, metavar="PREFIX",
                   help="trace gradient bursts: an update whose gradient norm (before clipping) exceeds "
                        "--burst-factor x the median of the previous 200 is re-run from its parameters and RNG "
                        "state term by term (each objective term's gradient norm on each part, kept in the record "
                        "and printed) and written to PREFIX.<update>.pt (parameters before it, RNG state, batch; "
                        "the first 3)")
    p.add_argument("--burst-factor", type=float, default=20.0)
    p.add_argument("--save-every", type=float, default=600.0,
                   help="with --save-model: also write it (weights, Adam state, record so far) every this many seconds "
                        "of training, so a long run that is stopped keeps its updates (0: only at the end)")
    p.add_argument("--mse-cases", type=int, default=1000, help="held-out transitions for check 1")
    p.add_argument("--rank-cases", type=int, default=100)
    p.add_argument("--rank-candidates", type=int, default=1000)
    p.add_argument("--rank-risks", default="latent,latent_nll,latent_overlap,observation,observation_corrected",
                   help="check 2 (H = 1) also by G under these risk forms (comma list of latent, latent_nll, "
                        "latent_overlap, observation, observation_corrected; the agent's own --set risk=... is always "
                        "ranked): the observation forms decode every candidate (100 x 1000 x J frames: minutes each "
                        "on a CPU)")
    p.add_argument("--rank-horizon", type=int, default=5,
                   help="check 2 again with H-step sequences toward o_{t+H} (1: skip; see the report)")
    p.add_argument("--goals", type=int, default=20)
    p.add_argument("--goal-steps", type=int, default=50)
    p.add_argument("--success-radius", type=float, default=0.05)
    p.add_argument("--strip-steps", type=int, default=8, help="steps of the real vs imagined strip")
    p.add_argument("--data", default=None,
                   help="folder for the collected buffers (train/, heldout/): reused when present, else written")
    p.add_argument("--load-model", default=None, help="a state dict saved by --save-model: skip training")
    p.add_argument("--save-model", default=None, help="save the trained agent's state dict here")
    p.add_argument("--resume", action="store_true",
                   help="with --load-model: train that model on (--updates / --train-seconds more, its Adam state "
                        "too when the file has it), continue its training record and save it to --save-model")
    p.add_argument("--latency-presets", default="paper,small,realtime",
                   help="planner presets whose step latency (batch 1) is measured; empty: none")
    p.add_argument("--latency-steps", type=int, default=60, help="timed policy steps per preset (after 5 warm-up)")
    p.add_argument("--checks", default=None,
                   help="what to run, comma-separated: 1 (and the imagined strip), 2, 3, latency, 5 (trains a "
                   "second model on the left half of the arena; its own budget: --epistemic-updates / -seconds); "
                   "default 1,2,3,latency (with --quick all five)")
    p.add_argument("--epistemic-updates", type=int, default=3000)
    p.add_argument("--epistemic-seconds", type=float, default=1800.0)
    p.add_argument("--notes", default=None, help="a markdown file appended to the report (the reading of the run)")
    p.add_argument("--merge", action="store_true",
                   help="start from the results.json already in --fig-dir (add or replace the checks run now)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="where the agent runs (cpu, cuda); observations come from the CPU, as on a robot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed the model's initialisation and training alone (default: --seed's stream): replicate a "
                        "model on the same data, held-out cases, goals and start states")
    p.add_argument("--out", default=None,
                   help="the report page (default docs/bench_active_inference.md; with --quick <fig-dir>/page.md)")
    p.add_argument("--fig-dir", default=None,
                   help="figures and results.json (default docs/bench_active_inference/; with --quick a new "
                        "folder under the system's temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long run for tests: smoke preset, tiny data, few updates and cases")
    args = p.parse_args(argv)
    args.rank_risks = [form.strip() for form in args.rank_risks.split(",") if form.strip()]
    if unknown := [form for form in args.rank_risks if form not in RISKS]:
        p.error(f"--rank-risks: unknown risk form(s) {unknown}; choose from {', '.join(RISKS)}")
    if args.resume and not (args.load_model and args.save_model):
        p.error("--resume trains the --load-model on and needs --save-model for the result (it may be the same path)")
    if args.quick:
        # a smoke run never writes over the docs' page, figures or results.json
        args.fig_dir = args.fig_dir or tempfile.mkdtemp(prefix="bench_active_inference_quick_")
        args.out = args.out or str(Path(args.fig_dir) / "page.md")
        args.preset = "smoke"
        args.train_episodes, args.heldout_episodes, args.episode_length, args.num_envs = 2, 1, 12, 2
        # 6 updates, whatever the load: a time cap that could bind would make the update counts (which the tests
        # compare between a run and its resume) depend on how busy the machine is
        args.updates, args.train_seconds, args.log_every = 6, 600.0, 1
        args.mse_cases, args.rank_cases, args.rank_candidates, args.rank_horizon = 16, 4, 20, 2
        args.goals, args.goal_steps, args.strip_steps = 2, 3, 3
        args.latency_presets, args.latency_steps = "small,realtime", 3
        args.checks, args.epistemic_updates = args.checks or "1,2,3,latency,5", 3
    args.checks = args.checks or "1,2,3,latency"
    if args.device != "cpu" and check_names(args.checks) - {"latency"}:
        p.error(f"--device {args.device} times the policy only (--checks latency); checks 1, 2, 3 and 5 run on the "
                "CPU here")
    args.fig_dir = args.fig_dir or str(ROOT / "docs" / "bench_active_inference")
    args.out = args.out or str(ROOT / "docs" / "bench_active_inference.md")
    return args


def _command_line_value(text: str):
    """A ``--set`` value as Hydra would read it: none / null, true / false, an int, a float, else the string."""
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: list[str]) -> dict:
    """``["obs_std=0.1", "planner=cem"]`` -> typed ActiveInferenceConfig overrides, checked as ``train_agent.py``
    checks ``agent.<field>=`` (``training.cli.typed_config_overrides``)."""
    config_class = ActiveInferenceAgent.config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    raw = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        raw[key] = _command_line_value(value)
    try:
        return typed_config_overrides(config_class, config_class(), raw, source="the default")
    except ConfigError as err:
        raise SystemExit(f"--set {err.args[0]}") from None


def check_names(text: str) -> set[str]:
    """The checks of a ``--checks`` value (comma-separated, spaces ignored)."""
    return {c.strip() for c in text.split(",") if c.strip()}


def build_agent(args) -> ActiveInferenceAgent:
    """A fresh agent on 64x64 pixels (2 action dimensions) with the settings of ``--preset`` / ``--set``."""
    config = ActiveInferenceAgent.make_config(args.preset, obs_type="pixels", **parse_overrides(args.overrides))
    return ActiveInferenceAgent(config, (3, 64, 64), 2, device=args.device)


def load_model_file(agent: ActiveInferenceAgent, path, optimizer: bool = False) -> dict:
    """Load the weights of a ``--save-model`` file into ``agent`` (and, with ``optimizer``, its Adam state and
    torch's RNG state, when the file has them); returns its training record (``{}`` if none). The learning rate
    stays the one of the agent's config (``--set lr=``): Adam's saved state carries the old one, which would
    silently win."""
    saved = load_plain(path, map_location=agent.device)
    agent.load_state_dict(saved["agent"])
    if optimizer and "optimizer" in saved:
        adam = agent.optimizers()["model"]
        adam.load_state_dict(optimizer_state_for(agent, saved))
        for group in adam.param_groups:
            group["lr"] = agent.config.lr
    if optimizer:
        # resuming continues the run's random streams (batches drawn, latent samples) where the file left them, so
        # a run saved and resumed takes the very updates of one that never stopped
        if "rng" in saved:
            restore_rng(saved["rng"])
        elif "rng_state" in saved:  # files of 2026-12-04 kept torch's CPU state alone (older ones none)
            torch.set_rng_state(saved["rng_state"].cpu())
    return saved.get("train", {})


def optimizer_state_for(agent: ActiveInferenceAgent, saved: dict) -> dict:
    """The saved Adam state of a ``--save-model`` file laid out for ``agent``'s parameters. Adam keys its state by
    parameter index, so a parameter the file lacks (a canvas switched on with ``--set decoder_canvas=add``)
    shifts every index after it: the file's state is mapped back by parameter name, and the new parameter starts
    with no Adam state (as in a fresh Adam)."""
    names = [f"world_model.{n}" for n, _ in agent.world_model.named_parameters()]
    names += [f"reward_head.{n}" for n, _ in agent.reward_head.named_parameters()]
    state = saved["optimizer"]
    (group,) = state["param_groups"]
    old = [n for n in names if n in saved["agent"]]
    if len(old) != len(group["params"]):
        raise ValueError(f"the file's Adam state has {len(group['params'])} parameters but its weights name "
                         f"{len(old)} of this agent's; was it saved by another model?")
    by_name = {n: state["state"][i] for n, i in zip(old, group["params"], strict=True) if i in state["state"]}
    return {"state": {i: by_name[n] for i, n in enumerate(names) if n in by_name},
            "param_groups": [{**group, "params": list(range(len(names)))}]}


def save_model_file(agent: ActiveInferenceAgent, record: dict, path) -> None:
    """The agent, its Adam state and its training record, written whole or not at all (a crash or a full disk
    leaves the previous file, which may be the ``--load-model`` being trained on)."""
    save_atomic({"agent": agent.state_dict(), "optimizer": agent.optimizers()["model"].state_dict(), "train": record,
                 "rng": capture_rng()}, path)


def load_saved_agent(args) -> ActiveInferenceAgent:
    """The agent of ``--load-model`` with the settings of ``--preset`` / ``--set``, in eval mode."""
    agent = build_agent(args)
    load_model_file(agent, args.load_model)
    return agent.eval()


# -------------------------------------------------------------------------------------- data


def collect(args, episodes: int, seed: int) -> ReplayBuffer:
    """``episodes`` uniform-random-action episodes (pixels + physics) in a fresh buffer."""
    n = min(args.num_envs, episodes)
    rounds = -(-episodes // n)
    buffer = ReplayBuffer(rounds * n * (args.episode_length + 2) + n, domain=args.task.split("-")[0])
    env = make_env(args.task, obs=("pixels", "physics"), action_repeat=args.action_repeat,
                   episode_length=args.episode_length, num_envs=n, num_workers=0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    try:
        td = env.reset()
        for _ in range(rounds * args.episode_length):
            td["action"] = torch.rand(n, *env.action_spec.shape[1:], generator=gen) * 2 - 1
            td, td_next = env.step_and_maybe_reset(td)
            buffer.extend(td)
            td = td_next
    finally:
        env.close()
    return buffer


# ------------------------------------------------------------------------------------- training


def smooth(values: list[float], window: int) -> np.ndarray:
    """Moving average (``window`` points, 'valid' part); the values themselves when too few."""
    v = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(v)))
    return np.convolve(v, np.ones(window) / window, mode="valid")


def part_norms(metrics: dict[str, float], kind: str = "grad_norm") -> dict[str, float]:
    """Each part's gradient norm (``kind="step"``: step size) of an update's metrics (``grad_norm_encoder`` ->
    ``encoder``)."""
    return {k.removeprefix(f"{kind}_"): v for k, v in metrics.items() if k.startswith(f"{kind}_")}


class BurstTracer:
    """``--burst-dump``: finds the updates whose gradient norm (before clipping) jumps above ``factor`` x the median
    of the previous 200 and re-runs each from the parameters and RNG state it started from, one objective term at a
    time (:meth:`ActiveInferenceAgent.gradient_norms_by_term`), so a burst is traced to a term and a part. Keeps
    a copy of the parameters before every update (a few MB); leaves the training's RNG stream as it was.

    It also keeps the last ``HISTORY`` updates' gradient norms and step sizes (``||theta_after - theta_before||``,
    the update's ``step_*`` metrics) part by part, and files them with each burst: the parameters may move far (a
    run-away) before any gradient norm does, as they did before the burst of 2026-12-04
    (docs/bench_active_inference.md)."""

    MAX_DUMPS = 3
    HISTORY = 40

    def __init__(self, agent: ActiveInferenceAgent, prefix: str, factor: float, previous: dict | None = None,
                 min_history: int = 50):
        self.agent, self.prefix, self.factor, self.min_history = agent, prefix, float(factor), int(min_history)
        self.recent: list[float] = []
        self.bursts: list[dict] = list((previous or {}).get("bursts", []))
        self._state = self._rng = self._batch = None
        self.history: list[dict] = []

    def before(self, batch: TensorDict) -> None:
        self._state = {k: v.detach().clone() for k, v in self.agent.state_dict().items()}
        self._rng, self._batch = capture_rng(), batch

    def after(self, update: int, metrics: dict[str, float]) -> None:
        self.history = [*self.history[-(self.HISTORY - 1):],
                        {"update": update, "grad_norm": metrics.get("grad_norm"), "step": part_norms(metrics, "step"),
                         "grad": part_norms(metrics),
                         "kl_transition": metrics.get("kl_transition"), "posterior_std": metrics.get("posterior_std"),
                         "recon": metrics.get("recon")}]
        norm = metrics.get("grad_norm")
        if norm is None:
            return
        median = float(np.median(self.recent)) if self.recent else 0.0
        if len(self.recent) >= self.min_history and norm > self.factor * median:
            self._trace(update, metrics, median)
        self.recent = [*self.recent[-199:], norm]

    def _trace(self, update: int, metrics: dict[str, float], median: float) -> None:
        rng_now = capture_rng()
        state_now = {k: v.detach().clone() for k, v in self.agent.state_dict().items()}
        self.agent.load_state_dict(self._state)
        restore_rng(self._rng)
        try:
            by_term = self.agent.gradient_norms_by_term(self._batch)
        finally:  # the training goes on from where it was, its RNG stream untouched
            self.agent.load_state_dict(state_now)
            restore_rng(rng_now)
        entry = {"update": update, "grad_norm": metrics["grad_norm"], "median_before": median,
                 "grad_norm_by_part": part_norms(metrics),
                 "by_term": by_term,  # its "total" row re-computes the update's gradient: compare with the above
                 "metrics": {k: v for k, v in metrics.items() if not k.startswith("grad_norm")},
                 "history": list(self.history)}  # the updates up to and including this one
        self.bursts.append(entry)
        ratio = metrics["grad_norm"] / max(median, 1e-30)
        print(f"[bench_ai] gradient burst at update {update}: norm {metrics['grad_norm']:.3g} ({ratio:.3g}x the "
              f"median of the last {len(self.recent)})", flush=True)
        parts = list(next(iter(by_term.values())))
        print("    term \\ part  " + "".join(f"{p:>12}" for p in parts), flush=True)
        for term, norms in by_term.items():
            print(f"    {term:<13}" + "".join(f"{norms[p]:12.3g}" for p in parts), flush=True)
        # the run-up: each recent update's step size per part (a run-away moves the parameters before the norms)
        step_parts = list(self.history[-1]["step"])
        print("    step sizes of the last updates (update: " + ", ".join(step_parts) + "):", flush=True)
        for h in self.history[-8:]:
            print(f"      {h['update']}: " + " ".join(f"{h['step'][p]:.3g}" for p in step_parts), flush=True)
        if sum(1 for b in self.bursts if "file" in b) < self.MAX_DUMPS:
            path = f"{self.prefix}.{update}.pt"
            save_atomic({"agent_before": self._state, "rng": self._rng, "device": str(self.agent.device),
                         "batch": self._batch.to_dict(),
                         "batch_size": list(self._batch.batch_size), "burst": entry}, path)
            entry["file"] = path


def train(agent: ActiveInferenceAgent, buffer: ReplayBuffer, args, previous: dict | None = None) -> dict:
    """``--updates`` / ``--train-seconds`` world-model updates; with ``previous`` (the record of a loaded model,
    ``--resume``) the update count, curve and time continue from it. With ``--save-model`` the model and the record
    so far are written every ``--save-every`` seconds too (the caller writes the final one)."""
    kwargs = agent.sample_spec().sample_kwargs()
    previous = previous or {}
    curve, steps = list(previous.get("free_energy", [])), list(previous.get("free_energy_steps", []))
    # the largest gradient norm (before clipping) of each log window, and the windows' last updates: a spike of
    # the free energy that follows a gradient burst shows here (records from before this was kept lack it)
    norms, norm_steps = list(previous.get("grad_norm_max", [])), list(previous.get("grad_norm_steps", []))
    window_max = float("nan")
    # the same for each part of the model (encoder, posterior, transition, decoder, reward): where a burst is; and
    # each part's largest step (parameter change) per window, where a run-away shows before the norms do
    parts = {k: list(v) for k, v in previous.get("grad_norm_parts_max", {}).items()}
    part_step_sizes = {k: list(v) for k, v in previous.get("step_parts_max", {}).items()}
    part_steps = list(previous.get("grad_norm_parts_steps", []))
    part_max: dict[str, float] = {}
    step_max: dict[str, float] = {}
    # the inverse-dynamics term's error at each logged update (``--set inverse_weight=...``), beside the free energy
    with_inverse = agent.config.inverse_weight > 0
    inverse = list(previous.get("inverse", []))
    done = int(previous.get("updates", 0))
    start = last_save = time.perf_counter()
    updates = done

    def record() -> dict:
        seconds = time.perf_counter() - start + float(previous.get("seconds", 0.0))
        sm = smooth(curve, max(1, len(curve) // 10))
        # "decreases monotonically (smoothed)": the smoothed curve read at 10 evenly spaced points
        marks = sm[np.linspace(0, len(sm) - 1, min(10, len(sm))).round().astype(int)]
        return {"updates": updates, "seconds": seconds, "seconds_per_update": seconds / max(updates, 1),
                "sample_kwargs": {k: v for k, v in kwargs.items() if v is not None},
                "free_energy_steps": steps, "free_energy": curve, "grad_norm_steps": norm_steps,
                "grad_norm_max": norms, "grad_norm_parts_steps": part_steps, "grad_norm_parts_max": parts,
                "step_parts_max": part_step_sizes, **({"inverse": inverse} if with_inverse else {}),
                "free_energy_first_smoothed": float(sm[0]),
                "free_energy_last_smoothed": float(sm[-1]), "smoothed_marks": marks.tolist(),
                "smoothed_monotone": bool(np.all(np.diff(marks) <= 0)),
                "resumed_at": [*previous.get("resumed_at", []), done] if previous else [],
                **({"bursts": tracer.bursts} if tracer is not None else {})}

    tracer = BurstTracer(agent, args.burst_dump, args.burst_factor, previous) if args.burst_dump else None
    while updates - done < args.updates and time.perf_counter() - start < args.train_seconds:
        batch = buffer.sample(**kwargs)
        if tracer is not None:
            tracer.before(batch)
        metrics = {k: float(v) for k, v in agent.update(batch).items()}
        updates += 1
        if tracer is not None:
            tracer.after(updates, metrics)
        if "grad_norm" in metrics:
            window_max = np.fmax(window_max, metrics["grad_norm"])
        for part, value in part_norms(metrics).items():
            part_max[part] = max(part_max.get(part, 0.0), value)
        for part, value in part_norms(metrics, "step").items():
            step_max[part] = max(step_max.get(part, 0.0), value)
        if updates % args.log_every == 0 or updates == 1:
            curve.append(metrics["free_energy"])
            steps.append(updates)
            if with_inverse:
                inverse.append(metrics["inverse"])
            if not np.isnan(window_max):
                norms.append(float(window_max))
                norm_steps.append(updates)
            window_max = float("nan")
            if part_max:
                for record_of, window in ((parts, part_max), (part_step_sizes, step_max)):
                    for part, value in window.items():
                        # a part new to a resumed record starts where the record does not reach: NaN before it
                        record_of.setdefault(part, [float("nan")] * len(part_steps)).append(value)
                part_steps.append(updates)
                part_max, step_max = {}, {}
            if updates % (args.log_every * 20) == 0:
                grad = f", grad norm max {norms[-1]:.3g}" if norm_steps and norm_steps[-1] == updates else ""
                extra = f", kl_overshooting {metrics['kl_overshooting']:.2f}" if agent.config.overshooting > 1 else ""
                extra += f", inverse {metrics['inverse']:.3f}" if with_inverse else ""
                print(f"[bench_ai] update {updates}: free energy {metrics['free_energy']:.1f} "
                      f"(recon {metrics['recon']:.1f}, kl_transition {metrics['kl_transition']:.2f}{extra}, "
                      f"epistemic {metrics['epistemic']:.3f}{grad}), {time.perf_counter() - start:.0f} s", flush=True)
            if args.save_model and args.save_every > 0 and time.perf_counter() - last_save >= args.save_every:
                save_model_file(agent, record(), args.save_model)
                last_save = time.perf_counter()
    return record()


# ----------------------------------------------------------------------------------------- checks


@torch.no_grad()
def one_step_mse(agent: ActiveInferenceAgent, heldout: ReplayBuffer, args) -> dict:
    """Check 1: MSE of decode(E[p(s'|s,a)]) vs o_{t+1}, and of the copy-current-frame baseline.

    Also the model's predicted *change* applied to the frame, o_t + decode(s') - decode(s) with s the posterior mean
    of o_t (``change_*``): what the decoder draws the same way for s and s' (its blur of the static scene, of the arm)
    cancels, so this form asks whether the transition moves the picture the right way. Its controls are the same
    change under the zero action and under another case's action: when those are no worse, the gain over copying
    comes from the decoder, not from the transition."""
    wm = agent.world_model
    with fixed_draws(args.seed + 10):
        batch = heldout.sample(args.mse_cases, frame_stack=agent.frame_stack, keys=["pixels"])
    mean, _ = wm.posterior(batch["pixels"])
    action = batch["action"].float()

    def predicted(a: Tensor) -> Tensor:
        return wm.decode_mean(wm.transition_members(mean, a)[0].mean(0))

    pred, now = predicted(action), wm.decode_mean(mean)
    target = wm.target(batch["next", "pixels"])
    current = wm.target(batch["pixels"])
    recon = wm.decode_mean(wm.posterior(batch["next", "pixels"])[0])
    static = static_pixels(current, target)
    out = {"cases": args.mse_cases, "static_pixel_fraction": static.float().mean().item()}
    images = {"model": pred, "copy_frame": current, "reconstruction": recon, "change": current + pred - now,
              "change_zero_action": current + predicted(torch.zeros_like(action)) - now,
              "change_other_action": current + predicted(action.roll(1, 0)) - now}
    for name, image in images.items():
        split = error_split(image, target, static)
        out[f"{name}_mse"], out[f"{name}_mse_static_part"] = split["mse"], split["static_part"]
    # the same cases for every image, so the comparison with the copy is paired: its standard error says whether a
    # small margin is more than which cases were drawn
    per_case = {name: (images[name] - target).square().flatten(1).mean(1) for name in ("model", "change", "copy_frame")}
    for name in ("model", "change"):
        for key, value in paired_difference(per_case[name], per_case["copy_frame"]).items():
            out[f"{name}_minus_copy_{key}"] = value
    out["change_pass"] = out["change_mse"] < min(out["copy_frame_mse"], out["change_zero_action_mse"],
                                                 out["change_other_action_mse"])
    return {**out, "pass": out["model_mse"] < out["copy_frame_mse"]}


@contextlib.contextmanager
def fixed_draws(seed: int):
    """Draws from the global torch generator inside the block come from ``seed``, and the generator is left as it
    was: a check's held-out cases are the same whatever ran before it (training, other checks), so two models of
    the same data are scored on the same cases."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def paired_difference(a: Tensor, b: Tensor) -> dict:
    """Per-case errors ``a`` and ``b`` of the same cases ``[N]``: the mean of ``a - b``, its standard error
    (sample std / sqrt N) and the fraction of cases where ``a`` is below ``b``."""
    diff = (a - b).double()
    return {"mean": diff.mean().item(), "se": (diff.std() / math.sqrt(len(diff))).item(),
            "below_fraction": (diff < 0).double().mean().item()}


def error_split(image: Tensor, target: Tensor, static: Tensor) -> dict:
    """The per-pixel MSE of ``image`` against ``target`` and the part of it on pixels of the static scene
    (``static_pixels``); the rest of the total is on the moving pixels."""
    error = (image - target).square()
    return {"mse": error.mean().item(), "static_part": (error * static).sum().item() / error.numel()}


def static_pixels(current: Tensor, target: Tensor, threshold: float = 0.1) -> Tensor:
    """``[N, 3, H, W]`` mask of the pixels that show the static scene in both frames: every channel within
    ``threshold`` of the median frame of the sample (on point_mass the arena; the mass covers ~1.4%)."""
    scene = target.median(dim=0).values
    moving = ((target - scene).abs().amax(1, keepdim=True) > threshold) | (
        (current - scene).abs().amax(1, keepdim=True) > threshold)
    return (~moving).expand_as(target)


def rank_summary(rank: Tensor) -> dict:
    """Check 2's reading of per-case ranks ``[N]`` (:func:`true_action_rank`): the fraction of cases in the best
    20% and the median rank."""
    return {"fraction_in_best_20pct": float((rank < 0.2).float().mean()), "median_rank": float(rank.median())}


def true_action_rank(g: Tensor) -> Tensor:
    """``[N]``: per case, the fraction of the random candidates ``g[:, 1:]`` scored better than the true action
    ``g[:, 0]`` (lower is better), ties counted half (mid-rank)."""
    return ((g[:, 1:] < g[:, :1]).float() + 0.5 * (g[:, 1:] == g[:, :1]).float()).mean(1)


@torch.no_grad()
def scorer_ranking(agent: ActiveInferenceAgent, heldout: ReplayBuffer, args, horizon: int = 1) -> dict:
    """Check 2: rank of the true actions a_{t:t+H} among random H-step candidates, with the goal o_{t+H}
    (H = 1: the spec's check). Ranked by G (the executed-plan score: risk summed over the imagined
    path minus the weighted epistemic value) and, for H > 1, by the risk of the last imagined step alone."""
    n, k, h = args.rank_cases, args.rank_candidates, int(horizon)
    with fixed_draws(ranking_seed(args, h)):  # the cases and the scorer's state samples
        return _scorer_ranking(agent, heldout, args, n, k, h)


def ranking_seed(args, horizon: int) -> int:
    """The seed of :func:`scorer_ranking`'s draws (cases, then the scorer's state samples) at ``horizon``."""
    return args.seed + 11 + int(horizon)


def ranking_cases(heldout: ReplayBuffer, frame_stack: int, n: int, k: int, h: int, action_dim: int,
                  seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Check 2's cases: ``n`` held-out slices of ``h`` steps from torch's global generator (inside the caller's
    :func:`fixed_draws`), and ``k`` uniform random candidate sequences per case from their own generator
    (``seed``). Returns the first observation ``[n, ...]``, the goal o_{t+h} ``[n, ...]`` and the actions
    ``[n, 1 + k, h, A]`` with the true sequence first. Diagnostics (docs/bench_active_inference/) rank on these."""
    if h == 1:
        batch = heldout.sample(n, frame_stack=frame_stack, keys=["pixels"])
        first, goal_frames = batch["pixels"], batch["next", "pixels"]
    else:
        batch = heldout.sample(n, horizon=h, frame_stack=frame_stack, keys=["pixels"])
        first, goal_frames = batch["pixels"][:, 0], batch["next", "pixels"][:, -1]
    true_actions = batch["action"].float().reshape(n, 1, h, -1)
    candidates = torch.rand(n, k, h, action_dim, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return first, goal_frames, torch.cat([true_actions, candidates], dim=1)


def _scorer_ranking(agent: ActiveInferenceAgent, heldout: ReplayBuffer, args, n: int, k: int, h: int) -> dict:
    wm = agent.world_model
    first, goal_frames, actions = ranking_cases(heldout, agent.frame_stack, n, k, h, wm.action_dim, args.seed + 1)
    task = agent.infer_task(GoalObservation(obs=TensorDict({"pixels": goal_frames}, batch_size=[n])))
    policy = agent.policy(task)
    state = wm.observe(wm.initial_state(n), first, None, None)
    goal_mean, goal_std = policy._goal(n)
    draws = policy.draw_noise(n, h)  # the state samples and transition draws, the same for every risk form
    current = wm.target(first)  # o_t in the decoder's scale (risk="observation_corrected")
    terms = policy.score(state, actions, goal_mean, goal_std, draws=draws, current=current)
    out = {"cases": n, "candidates": k, "horizon": h, "risk_form": agent.config.risk}
    # G as computed adds the constant ambiguity (~1.7e4 nats for 64x64x3 pixels), which rounds float32 G
    # values into ties; "G_nonconstant" ranks as the policy's planner does (plan_value: risk - epistemic_weight
    # * epistemic, screened candidates last), which is G's order without it.
    terms["G_nonconstant"] = plan_value(terms, agent.config.epistemic_weight)
    if h == 1:  # G under the other risk forms asked for, on the same cases, candidates and draws
        for form in args.rank_risks:
            if form == agent.config.risk:
                continue
            other = ActiveInferencePolicy(wm, replace(agent.config, risk=form), goal=task.z,
                                          goal_obs=wm.target(goal_frames))
            started = time.perf_counter()
            t = other.score(state, actions, goal_mean, goal_std, draws=draws, current=current)
            rank = true_action_rank(plan_value(t, agent.config.epistemic_weight))
            out.update({f"{form}_risk_G_{k}": v for k, v in rank_summary(rank).items()})
            out[f"{form}_risk_seconds"] = round(time.perf_counter() - started, 1)
    if h > 1 and agent.config.risk == "latent":  # the last imagined step's KL to the goal belief (J samples)
        j = agent.config.num_samples
        last = []
        for i in range(n):
            roll = wm.imagine(state[i : i + 1].repeat_interleave(k + 1, dim=0), actions[i], num_samples=j,
                              noise=policy.common_noise(policy.draw_noise(1, h), k + 1))
            kl = gaussian_kl(roll["mean"][:, -1], roll["std"][:, -1], goal_mean[i], goal_std[i])
            last.append(kl.reshape(k + 1, j).mean(-1))
        terms["final_risk"] = torch.stack(last)
    for name in ("G_nonconstant", "G", "risk", "final_risk"):
        if name not in terms.keys():
            continue
        out.update({f"{name}_{k}": v for k, v in rank_summary(true_action_rank(terms[name])).items()})
    out["pass"] = out["G_nonconstant_fraction_in_best_20pct"] >= 0.8
    return out


def goal_episodes(env, td: TensorDict, policy: Policy, steps: int, task, goal_pos: np.ndarray) -> dict:
    """Run ``policy`` from the observations ``td`` for ``steps`` steps; the distance to each goal after every step
    ``[steps, N]`` and, for an active inference policy, the executed plan's EFE terms ``[steps, N]``."""
    n = td.batch_size[0]
    carry = policy.init_carry(n)
    is_first = torch.ones(n, dtype=torch.bool)
    dists, terms = [], {t: [] for t in EFE_TERMS}
    with torch.no_grad():
        for _ in range(steps):
            action, carry = policy.step(td, carry, is_first)
            for t in EFE_TERMS:
                if f"efe_{t}" in carry.keys():
                    terms[t].append(carry[f"efe_{t}"].cpu().numpy())
            td["action"] = action
            td = env.step(td)["next"]
            dists.append(np.linalg.norm(task.body_position(td["physics"].cpu().numpy()) - goal_pos, axis=-1))
            is_first = torch.zeros(n, dtype=torch.bool)
    return {"distance": np.stack(dists), "terms": {t: np.stack(v) for t, v in terms.items() if v}}


def goal_cases(args, heldout: ReplayBuffer):
    """Check 3's goals: ``--goals`` physics states drawn from the held-out episodes (``[N, S]``) and their body
    positions; with :func:`goal_env`, whose reset gives the start states, the cases every check-3 reading shares."""
    torch.manual_seed(args.seed + 2)
    goal_physics = heldout.sample(args.goals, keys=["physics"])["physics"]
    return goal_physics, get_task(args.task).body_position(goal_physics.cpu().numpy())


def goal_env(args):
    """The ``--goals`` envs of check 3, seeded so that every reset gives the same start states."""
    return make_env(args.task, obs=("pixels", "physics"), action_repeat=args.action_repeat,
                    episode_length=args.goal_steps + 1, num_envs=args.goals, num_workers=0, seed=args.seed + 3)


def goal_reaching(agent: ActiveInferenceAgent, heldout: ReplayBuffer, args) -> dict:
    """Check 3: success and final distance from ``--goals`` goal images for the agent, its risk-only
    ablation (``epistemic_weight=0``), uniform-random and zero actions, from the same start states."""
    task = get_task(args.task)
    goal_physics, goal_pos = goal_cases(args, heldout)
    out = {"goals": args.goals, "steps": args.goal_steps, "success_radius": args.success_radius}
    curves, terms = {}, {}
    for name in ("agent", "risk_only", "random", "zero"):
        env = goal_env(args)
        start = time.perf_counter()
        try:
            # the goal frames are rendered in the episodes' own scene (reacher: the target ball the episode drew
            # at reset, which is not part of the physics state), then the start state is put back
            start_physics = env.reset()["physics"].clone()
            if "start_distance" not in out:  # the same start poses for every policy (the env's seed)
                out["start_distance"] = np.linalg.norm(task.body_position(start_physics.cpu().numpy()) - goal_pos,
                                                       axis=-1).tolist()
            goal_obs = env.set_physics_state(goal_physics)
            td = env.set_physics_state(start_physics)
            if name in ("agent", "risk_only"):
                with torch.no_grad():
                    inferred = agent.infer_task(GoalObservation(obs=goal_obs.select("pixels")))
                policy = agent.policy(inferred)
                if name == "risk_only":  # the same risk (an observation risk: toward the same goal frame)
                    policy = ActiveInferencePolicy(agent.world_model, replace(agent.config, epistemic_weight=0.0),
                                                   goal=inferred.z, goal_obs=policy.goal_obs)
                policy.eval()
            elif name == "random":
                policy = UniformRandomPolicy(agent.action_dim, torch.Generator().manual_seed(args.seed + 4))
            else:
                policy = ZeroPolicy(agent.action_dim)
            torch.manual_seed(args.seed + 5)
            run = goal_episodes(env, td, policy, args.goal_steps, task, goal_pos)
        finally:
            env.close()
        dist = run["distance"]
        curves[name] = {"mean_distance": dist.mean(1).tolist(),
                        "success": (dist < args.success_radius).mean(1).tolist()}
        if run["terms"]:
            terms[name] = {t: v.mean(1).tolist() for t, v in run["terms"].items()}
        # per-goal final distances too: models and planners run on the same goals and starts compare goal by goal
        out[name] = {"success": float(np.mean(dist[-1] < args.success_radius)), "mean_distance": float(dist[-1].mean()),
                     "final_distance": dist[-1].tolist(), "seconds": time.perf_counter() - start}
        if name in ("agent", "risk_only"):  # what the planner scored
            out[name].update(risk=policy.config.risk, epistemic_weight=policy.config.epistemic_weight)
        print(f"[bench_ai] goals, {name}: success {out[name]['success']:.2f}, "
              f"mean final distance {out[name]['mean_distance']:.3f}", flush=True)
    a, r, z = out["agent"], out["random"], out["zero"]
    out["pass"] = (a["success"] >= max(r["success"], z["success"]) + CHECK3_MARGIN
                   and a["mean_distance"] < min(r["mean_distance"], z["mean_distance"]))
    out["curves"], out["efe_terms"] = curves, terms
    return out


def step_latency(agent: ActiveInferenceAgent, args) -> dict:
    """Policy step latency at batch 1 (observe + plan + act) for each planner preset in ``--latency-presets``,
    toward a goal, on ``--device`` with ``--threads`` threads (``latentrl.control.telemetry.step_latencies``, what
    the control benchmark uses): frames come from the CPU and the action goes back to it, so on a GPU each step
    includes both copies and waits for the plan."""
    names = [n for n in args.latency_presets.split(",") if n]
    out = {"threads": torch.get_num_threads(), "steps": args.latency_steps, "device": str(agent.device),
           "device_name": processor_name(agent.device), "presets": {}}
    with torch.no_grad():
        goal = agent.infer_task(GoalObservation(obs=TensorDict(
            {"pixels": torch.zeros(1, *agent.obs_shape, dtype=torch.uint8)}, batch_size=[1])))
    defaults = ActiveInferenceAgent.config_class()
    for name in names:
        planner = {k: PRESETS[name].get(k, getattr(defaults, k)) for k in PLANNER_FIELDS}
        cfg = replace(agent.config, **planner)
        policy = ActiveInferencePolicy(agent.world_model, cfg, goal=goal.z).eval()
        ms = step_latencies(policy, args.latency_steps, warmup=5, obs_shape=agent.obs_shape, seed=args.seed + 7)
        out["presets"][name] = {"planner": cfg.planner, "K": cfg.num_candidates, "rounds": cfg.cem_iterations
                                if cfg.planner == "cem" else 1, "H": cfg.plan_horizon, "J": cfg.num_samples,
                                "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                                "fits_50hz": bool(np.percentile(ms, 99) < 20.0)}
        print(f"[bench_ai] latency {name}: p50 {out['presets'][name]['p50_ms']:.1f} ms, "
              f"p99 {out['presets'][name]['p99_ms']:.1f} ms", flush=True)
    return out


def collect_left_half(args, episodes: int, seed: int) -> ReplayBuffer:
    """Check 5's data: episodes that start at rest in the left half (x in [-0.25, -0.05]) under random
    actions whose x part pushes left whenever the mass is right of x = -0.05."""
    n = min(args.num_envs, episodes)
    rounds = -(-episodes // n)
    buffer = ReplayBuffer(rounds * n * (args.episode_length + 2) + n, domain=args.task.split("-")[0])
    env = make_env(args.task, obs=("pixels", "physics"), action_repeat=args.action_repeat,
                   episode_length=args.episode_length, num_envs=n, num_workers=0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    try:
        for _ in range(rounds):
            td = env.reset()
            physics = torch.zeros(n, 4, dtype=torch.float64)
            physics[:, 0] = torch.rand(n, generator=gen, dtype=torch.float64) * 0.2 - 0.25
            physics[:, 1] = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 - 0.25
            td.update(env.set_physics_state(physics))
            for _ in range(args.episode_length):
                a = torch.rand(n, 2, generator=gen) * 2 - 1
                right = td["physics"][:, 0] > -0.05
                a[:, 0] = torch.where(right, -a[:, 0].abs(), a[:, 0])
                td["action"] = a
                td, td_next = env.step_and_maybe_reset(td)
                buffer.extend(td)
                td = td_next
    finally:
        env.close()
    return buffer


def _view_epistemic(wm, state, actions, context, samples: int = 8, chunk: int = 256):
    """AV's belief change summed over the imagined steps, mean over ``samples`` rollouts, per start ``[M]``
    (``context``: the newest observed frame of each start, the first view is stacked after it)."""
    out = []
    for i in range(0, actions.shape[0], chunk):
        rows = slice(i, i + chunk)
        roll = wm.imagine(state[rows], actions[rows], num_samples=samples)
        value = wm.view_epistemic(roll["mean"], roll["std"], context[rows].repeat_interleave(samples, 0))
        out.append(value.sum(-1).reshape(-1, samples).mean(-1))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def epistemic_check(args, config, heldout: ReplayBuffer) -> dict:
    """Check 5: a second model trained on left-half data only (:func:`collect_left_half`). On held-out
    uniform-random transitions over the whole arena, the epistemic value of the imagined transition
    p(s'|s_t, a_t) from q(s_t|o_t), split by where the mass really goes (x_{t+1} > 0: into the right
    half; else the left half). Also reported: from left-half states near the middle, imagined H-step
    moves right (action (+1, 0)) against moves left (these move the mass only ~0.03 in H = 5 steps)."""
    left = collect_left_half(args, args.train_episodes, args.seed + 50)
    xs = left.sample(2000, keys=["physics"])["physics"][:, 0]
    agent = ActiveInferenceAgent(config, (3, 64, 64), 2)
    with torch.enable_grad():
        train_args = argparse.Namespace(**{**vars(args), "updates": args.epistemic_updates,
                                           "train_seconds": args.epistemic_seconds})
        trained = train(agent, left, train_args)
    agent.eval()
    wm = agent.world_model
    out = {"updates": trained["updates"], "train_fraction_right_of_0": float((xs > 0).float().mean()),
           "train_max_x": float(xs.max())}
    torch.manual_seed(args.seed + 8)
    batch = heldout.sample(min(2000, len(heldout)), frame_stack=agent.frame_stack, keys=["pixels", "physics"])
    state = wm.observe(wm.initial_state(batch.batch_size[0]), batch["pixels"], None, None)
    ep = wm.imagine(state, batch["action"].float().unsqueeze(1), num_samples=8)["epistemic"]
    ep = ep.reshape(batch.batch_size[0], 8).mean(-1)
    right = batch["next", "physics"][:, 0] > 0
    out["transitions_right"], out["transitions_left"] = int(right.sum()), int((~right).sum())
    out["epistemic_right"], out["epistemic_left"] = float(ep[right].mean()), float(ep[~right].mean())
    # imagined moves from left-half states next to the middle
    near = (batch["physics"][:, 0] > -0.12) & (batch["physics"][:, 0] < -0.04)
    start = wm.observe(wm.initial_state(int(near.sum())), batch["pixels"][near], None, None)
    h = agent.config.plan_horizon
    for name, ax in (("right", 1.0), ("left", -1.0)):
        actions = torch.zeros(int(near.sum()), h, 2)
        actions[..., 0] = ax
        out[f"moves_{name}"] = float(wm.imagine(start, actions, num_samples=8)["epistemic"].sum(-1).mean())
    out["moves_start_states"], out["horizon"] = int(near.sum()), h
    # AV's belief change from the imagined view (agent.epistemic=belief_change), on the same transitions
    view = _view_epistemic(wm, state, batch["action"].float().unsqueeze(1), batch["pixels"][:, 3:])
    out["belief_change_right"], out["belief_change_left"] = float(view[right].mean()), float(view[~right].mean())
    for name, ax in (("right", 1.0), ("left", -1.0)):
        actions = torch.zeros(int(near.sum()), h, 2)
        actions[..., 0] = ax
        out[f"belief_change_moves_{name}"] = float(_view_epistemic(wm, start, actions,
                                                                   batch["pixels"][near][:, 3:]).mean())
    term = "belief_change" if agent.config.epistemic == "belief_change" else "epistemic"
    out["term"] = agent.config.epistemic
    out["pass"] = out[f"{term}_right"] > out[f"{term}_left"]
    print(f"[bench_ai] check 5: {out}", flush=True)
    return out


# ---------------------------------------------------------------------------------------- figures


def free_energy_axis(curve: np.ndarray) -> tuple[str, tuple[float, float] | None]:
    """The free-energy plot's y scale and limits: log while every value is positive; else (a Gaussian likelihood
    of small ``obs_std`` makes it negative, where a log axis shows nothing) linear, limited to the values after the
    first 2% of updates (the first few are orders of magnitude above the rest), with a 5% margin."""
    curve = np.asarray(curve, dtype=float)
    if curve.size == 0 or np.all(curve > 0):
        return "log", None
    rest = curve[int(len(curve) * 0.02):]
    low, high = float(rest.min()), float(rest.max())
    pad = 0.05 * (high - low) or 1.0
    return "linear", (low - pad, high + pad)


def plot_free_energy(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, curve = np.asarray(result["free_energy_steps"]), np.asarray(result["free_energy"])
    window = max(1, len(curve) // 10)
    grad = result.get("grad_norm_max") or []
    step_sizes = result.get("step_parts_max") or {}
    if grad:  # a second panel below: each log window's largest gradient norm before clipping (bursts show there)
        # and a third, when the record has them: each part's largest step (a run-away shows there first)
        rows = 3 if step_sizes else 2
        fig, (ax, gax, *sax) = plt.subplots(rows, 1, figsize=(5, 2.2 + 1.6 * (rows - 1)), dpi=80, sharex=True,
                                            height_ratios=(2, *[1] * (rows - 1)))
        gax.semilogy(result["grad_norm_steps"], grad, lw=0.8, color="k", label="all")
        for part, values in (result.get("grad_norm_parts_max") or {}).items():
            if np.nanmax(np.asarray(values, dtype=float), initial=0.0) > 0:  # e.g. no reward head trained: none
                gax.semilogy(result["grad_norm_parts_steps"], values, lw=0.5, alpha=0.7, label=part)
        if result.get("grad_norm_parts_max"):
            gax.legend(fontsize=6, ncol=3)
        gax.set_ylabel("gradient norm\n(window max)", fontsize=8)
        for part, values in step_sizes.items():
            if np.nanmax(np.asarray(values, dtype=float), initial=0.0) > 0:
                sax[0].semilogy(result["grad_norm_parts_steps"], values, lw=0.5, alpha=0.7, label=part)
        if sax:
            sax[0].set_ylabel("step size\n(window max)", fontsize=8)
        (sax or [gax])[0].set_xlabel("update")
    else:
        fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot(steps, curve, lw=0.6, alpha=0.4, label="per update")
    sm = smooth(curve.tolist(), window)
    ax.plot(steps[window - 1:], sm, lw=1.5, label=f"moving average ({window} points)")
    scale, limits = free_energy_axis(curve)
    ax.set_yscale(scale)
    if limits is not None:
        ax.set_ylim(*limits)
    if not grad:
        ax.set_xlabel("update")
    ax.set_ylabel("free energy (nats / observation)", fontsize=8)
    if limits is not None:
        ax.set_title("the first updates lie above the scale", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_panels(series: dict[str, dict[str, list[float]]], panels: list[tuple[str, str]], path: Path) -> None:
    """One line per policy in each panel: ``series[policy][key]`` against the step, for each
    ``(key, ylabel)`` in ``panels``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), dpi=80)
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for name, values in series.items():
            ax.plot(np.arange(1, len(values[key]) + 1), values[key], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_goal_curves(c3: dict, path: Path) -> None:
    """Mean distance to the goal and success rate after each step, one line per policy."""
    plot_panels(c3["curves"], [("mean_distance", "mean distance to goal"),
                               ("success", f"success (< {c3['success_radius']})")], path)


def plot_efe_terms(c3: dict, path: Path) -> None:
    """The executed plan's risk and epistemic value (mean over goals) at each step of the goal rollouts."""
    plot_panels(c3.get("efe_terms", {}), [("risk", "risk of the executed plan (nats)"),
                                          ("epistemic", "epistemic value of the executed plan")], path)


@torch.no_grad()
def imagined_strip(agent: ActiveInferenceAgent, heldout: ReplayBuffer, args, path: Path) -> dict:
    """Top: real frames o_1..o_H of one held-out slice; bottom: decode of the open-loop imagined means
    from q(s_0|o_0) under the recorded actions (the ensemble's mean prediction each step)."""
    from PIL import Image

    wm = agent.world_model
    h = args.strip_steps
    torch.manual_seed(args.seed + 6)
    sl = heldout.sample(1, horizon=h, frame_stack=agent.frame_stack, keys=["pixels"])
    s, _ = wm.posterior(sl["pixels"][:, 0])
    imagined = []
    for t in range(h):
        s = wm.transition_members(s, sl["action"][:, t].float())[0].mean(0)
        imagined.append(wm.decode(s)["pixels"][0])
    real = sl["next", "pixels"][0, :, -3:].float()
    imag = torch.stack(imagined)
    mse = ((imag - real) / 255.0).square().mean(dim=(1, 2, 3))
    rows = [torch.cat(list(x), dim=-1) for x in (real, imag)]
    img = torch.cat(rows, dim=-2).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(img).save(path, optimize=True)
    return {"steps": h, "open_loop_mse_per_step": mse.tolist()}


# ------------------------------------------------------------------------------------------ report


def static_note(c1: dict) -> str:
    """Check 1's error on the static scene, when measured (results before 2026-12-03 lack it)."""
    if "model_mse_static_part" not in c1:
        return ""
    return (f"; of which on the static scene ({c1['static_pixel_fraction']:.1%} of pixels): model "
            f"{c1['model_mse_static_part']:.5f}, reconstruction {c1['reconstruction_mse_static_part']:.5f}, copy "
            f"{c1['copy_frame_mse_static_part']:.5f}")


def paired_note(c1: dict, name: str) -> str:
    """Check 1's paired comparison of ``name`` with the copy, for the page (results from before it have none)."""
    if f"{name}_minus_copy_mean" not in c1:
        return ""
    return (f"; paired difference {c1[f'{name}_minus_copy_mean']:.2e} (s.e. {c1[f'{name}_minus_copy_se']:.1e}), "
            f"below the copy in {c1[f'{name}_minus_copy_below_fraction']:.0%} of cases")


def report(args, results: dict, argv: list[str]) -> str:
    tr, c1, c2, c3 = (results.get(k) for k in ("train", "check1", "check2", "check3"))
    cfg = results["config"]
    lines = [
        "# Deep active inference: small-scale benchmark (issue 14)",
        "",
        f"- Date: {results['date']}; machine: {results['machine']}.",
        f"- Command: `python scripts/bench_active_inference.py {' '.join(argv)}`"
        f" (total {results['total_seconds'] / 60:.1f} min).",
        f"- Task: {args.task}, 64x64 pixels, action repeat {args.action_repeat}, frame stack {cfg['frame_stack']}.",
        "- Data: none (a latency-only run)." if results.get("untrained") else
        f"- Data: {args.train_episodes} training + {args.heldout_episodes} held-out (another seed) uniform-random "
        f"episodes x {args.episode_length} steps.",
        f"- Agent: preset `{args.preset}`{' with ' + ', '.join(args.overrides) if args.overrides else ''} "
        f"(latent {cfg['latent_dim']}, ensemble {cfg['ensemble_size']}, batch {cfg['batch_size']}, "
        f"lr {cfg['lr']}, obs_std {cfg['obs_std']}, free nats {cfg.get('free_nats', 0.0)}, gradient clip "
        f"{cfg.get('max_grad_norm')}, decoder {cfg.get('decoder', 'conv')} depth {cfg['decoder_depth']}, planner "
        f"{cfg['planner']} K={cfg['num_candidates']} x {cfg['cem_iterations']} rounds, H={cfg['plan_horizon']}, "
        f"J={cfg['num_samples']}).",
    ]
    if tr is not None:
        norms = tr.get("grad_norm_max") or []
        clip = cfg.get("max_grad_norm")
        grad = (f"; gradient norm before clipping (each log window's largest): median {np.median(norms):.3g}, "
                f"max {max(norms):.3g}, clipped to {clip}" if norms else "")
        lines.append(f"- Training: {tr['updates']} updates in {tr['seconds']:.0f} s ({tr['seconds_per_update']:.2f} "
                     f"s/update){grad}.")
    lines += ["", "## Results", "", "| check | measured | target | pass |", "|---|---|---|---|"]
    if c1 is not None:
        lines.append(
            f"| 1. one-step prediction MSE (per pixel, [-0.5, 0.5] scale, {c1['cases']} held-out transitions) | "
            f"model {c1['model_mse']:.5f} vs copy-frame {c1['copy_frame_mse']:.5f} (reconstruction "
            f"{c1['reconstruction_mse']:.5f}){static_note(c1)}{paired_note(c1, 'model')} | model < copy | "
            f"{'yes' if c1['pass'] else 'no'} |")
        if "change_mse" in c1:
            lines.append(
                f"| 1, the model's change applied to the frame: o_t + decode(s') - decode(s) | {c1['change_mse']:.5f} "
                f"vs copy-frame {c1['copy_frame_mse']:.5f}; the same change under the zero action "
                f"{c1['change_zero_action_mse']:.5f}, under another case's action {c1['change_other_action_mse']:.5f}"
                f"{paired_note(c1, 'change')} | below copy and both controls | "
                f"{'yes' if c1['change_pass'] else 'no'} |")
    if tr is not None:
        lines.append(
            f"| 1. free energy, smoothed | {tr['free_energy_first_smoothed']:.1f} -> "
            f"{tr['free_energy_last_smoothed']:.1f}; monotone at 10 marks: {'yes' if tr['smoothed_monotone'] else 'no'}"
            f" | decreasing | {'yes' if tr['smoothed_monotone'] else 'no'} |")
    if c2 is not None:
        own = c2.get("risk_form", "latent")
        others = "".join(
            f"; by G with the {form} risk: {c2[f'{form}_risk_G_fraction_in_best_20pct']:.2f} (median rank "
            f"{c2[f'{form}_risk_G_median_rank']:.2f})" for form in RISKS
            if form != own and f"{form}_risk_G_fraction_in_best_20pct" in c2)
        lines.append(
            f"| 2. true a_t in best 20% of {c2['candidates']} random candidates by G ({c2['cases']} cases) | "
            f"{c2['G_nonconstant_fraction_in_best_20pct']:.2f} ({own} risk; median rank "
            f"{c2['G_nonconstant_median_rank']:.2f}; G with the constant ambiguity in float32, ties mid-ranked: "
            f"{c2['G_fraction_in_best_20pct']:.2f}; risk only {c2['risk_fraction_in_best_20pct']:.2f}{others}) | "
            f">= 0.80 | {'yes' if c2['pass'] else 'no'} |")
    c2m = results.get("check2_multistep")
    if c2m is not None:
        lines.append(
            f"| 2, H = {c2m['horizon']} (not in the spec): true a_t..a_t+{c2m['horizon'] - 1} in best 20% of "
            f"{c2m['candidates']} random sequences, goal o_t+{c2m['horizon']} ({c2m['cases']} cases) | by G "
            f"{c2m['G_nonconstant_fraction_in_best_20pct']:.2f} (median rank {c2m['G_nonconstant_median_rank']:.2f})"
            + (f"; by the last step's risk {c2m['final_risk_fraction_in_best_20pct']:.2f} (median rank "
               f"{c2m['final_risk_median_rank']:.2f})" if "final_risk_fraction_in_best_20pct" in c2m else "")
            + " | - | - |")
    if c3 is not None:
        a, r, z = c3["agent"], c3["random"], c3["zero"]
        ro = c3.get("risk_only")
        lines.append(
            f"| 3. goal reaching, {c3['goals']} goals x {c3['steps']} steps: success (< {c3['success_radius']}) / "
            f"mean final distance | agent {a['success']:.2f} / {a['mean_distance']:.3f}; "
            + (f"risk-only ablation {ro['success']:.2f} / {ro['mean_distance']:.3f}; " if ro else "")
            + f"random {r['success']:.2f} / {r['mean_distance']:.3f}; zero {z['success']:.2f} / "
            f"{z['mean_distance']:.3f} | agent >= both baselines + {CHECK3_MARGIN:.2f}, lower distance | "
            f"{'yes' if c3['pass'] else 'no'} |")
    c5 = results.get("check5")
    if c5 is not None:
        lines.append(
            f"| 5. epistemic value of imagined one-step transitions, model trained on the left half only "
            f"({c5['updates']} updates; {c5['train_fraction_right_of_0']:.1%} of its frames right of x = 0), "
            f"held-out random transitions going into the right ({c5['transitions_right']}) vs left "
            f"({c5['transitions_left']}) half | right {c5['epistemic_right']:.4f} vs left {c5['epistemic_left']:.4f} "
            f"(H = {c5['horizon']} imagined moves right vs left from {c5['moves_start_states']} states near the "
            f"middle: {c5['moves_right']:.4f} vs {c5['moves_left']:.4f})"
            + (f"; AV belief change from the imagined view: right {c5['belief_change_right']:.4f} vs left "
               f"{c5['belief_change_left']:.4f} (moves {c5['belief_change_moves_right']:.4f} vs "
               f"{c5['belief_change_moves_left']:.4f}); pass judged on {c5.get('term', 'ensemble')}"
               if "belief_change_right" in c5 else "")
            + f" | right > left | {'yes' if c5['pass'] else 'no'} |")
    strip = results.get("strip")
    if strip is not None:
        lines += ["", f"Open-loop imagination MSE per step over {strip['steps']} steps (per pixel, [0, 1] scale): "
                  + ", ".join(f"{v:.4f}" for v in strip["open_loop_mse_per_step"]) + "."]
    lat = results.get("latency")
    if lat is not None:
        where = f"{lat['device']} ({lat['device_name']})" if lat.get("device", "cpu") != "cpu" else "CPU"
        weights = " (untrained weights: a step's cost does not depend on them)" if results.get("untrained") else ""
        lines += ["", f"Policy step latency (observe + plan + act), batch 1, {where}, {lat['threads']} thread(s), "
                  f"{lat['steps']} steps after 5 warm-up{weights}:", "",
                  "| preset | planner | K x rounds | H | J | p50 (ms) | p99 (ms) | p99 < 20 ms (50 Hz) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in lat["presets"].items():
            lines.append(f"| {name} | {v['planner']} | {v['K']} x {v['rounds']} | {v['H']} | {v['J']} | "
                         f"{v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {'yes' if v['fits_50hz'] else 'no'} |")
    lines.append("")
    if tr is not None:
        lines += ["![free energy](bench_active_inference/free_energy.png)", ""]
    if strip is not None:
        lines += ["![real (top) vs open-loop imagined (bottom) frames](bench_active_inference/imagined.png)", ""]
    if c3 is not None:
        lines += ["![goal reaching curves](bench_active_inference/goal_reaching.png)", "",
                  "![EFE terms of the executed plans](bench_active_inference/efe_terms.png)", ""]
    lines += ["Raw numbers: `bench_active_inference/results.json`.", ""]
    if args.notes:
        lines += [Path(args.notes).read_text()]
    return "\n".join(lines)


def data_mismatch(buffer: ReplayBuffer, args, episodes: int, where: Path) -> list[str]:
    """How a reused buffer differs from what ``collect`` makes of these flags: the task's domain, the number of
    episodes and their length (the action repeat is not stored and cannot be checked)."""
    n = min(args.num_envs, episodes)
    expected_episodes = -(-episodes // n) * n
    domain = args.task.split("-")[0]
    problems = []
    if buffer.domain != domain:
        problems.append(f"{where} holds {buffer.domain} episodes, --task {args.task} is {domain}")
    if buffer.num_episodes != expected_episodes:
        problems.append(f"{where} holds {buffer.num_episodes} episodes, the flags ask {expected_episodes}")
    elif len(buffer) != expected_episodes * args.episode_length:
        problems.append(f"{where} holds episodes of {len(buffer) // max(buffer.num_episodes, 1)} steps, "
                        f"--episode-length is {args.episode_length}")
    return problems


def load_or_collect(args) -> tuple[ReplayBuffer, ReplayBuffer]:
    """The training and held-out buffers: read from ``--data`` when it holds them, else collected (and
    written there when ``--data`` is given)."""
    data = Path(args.data) if args.data else None
    if data is not None and (data / "train").exists() and (data / "heldout").exists():
        print(f"[bench_ai] reusing the buffers in {data}", flush=True)
        buffers = ReplayBuffer.load(data / "train"), ReplayBuffer.load(data / "heldout")
        problems = [p for buf, name, episodes in zip(buffers, ("train", "heldout"),
                                                     (args.train_episodes, args.heldout_episodes), strict=True)
                    for p in data_mismatch(buf, args, episodes, data / name)]
        if problems:
            raise SystemExit("bench_active_inference: --data " + str(data) + " was collected with other settings "
                             "(nothing was changed; give another --data, or the flags it was collected with):\n  "
                             + "\n  ".join(problems))
        return buffers
    train_buf = collect(args, args.train_episodes, args.seed)
    heldout = collect(args, args.heldout_episodes, args.seed + 1000)
    if data is not None:
        data.mkdir(parents=True, exist_ok=True)
        train_buf.save(data / "train")
        heldout.save(data / "heldout")
    return train_buf, heldout


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    fig_dir = Path(args.fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    checks = check_names(args.checks)
    unknown = checks - {"1", "2", "3", "latency", "5"}
    if unknown:
        raise SystemExit(f"--checks: unknown {sorted(unknown)}; valid: 1, 2, 3, latency, 5")
    # a latency-only run (e.g. on a lent GPU, whose machine cannot render dm_control) needs no data and, without
    # --load-model / --save-model, times the untrained model: the cost of a step does not depend on the weights
    needs_model = bool(checks & {"1", "2", "3"}) or bool(args.load_model or args.save_model)
    train_buf = heldout = None
    if needs_model or "5" in checks:
        train_buf, heldout = load_or_collect(args)
        print(f"[bench_ai] data: {len(train_buf)} + {len(heldout)} steps in {time.perf_counter() - t0:.0f} s",
              flush=True)
    collect_seconds = time.perf_counter() - t0
    if args.train_seed is not None:
        torch.manual_seed(args.train_seed)
    agent = build_agent(args)
    config = agent.config
    results = {}
    if args.merge and (fig_dir / "results.json").exists():
        results = json.loads((fig_dir / "results.json").read_text())
    results.update({"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": machine_description(args.device), "args": vars(args), "collect_seconds": collect_seconds,
                    "config": {k: getattr(config, k) for k in config.__dataclass_fields__}})
    results.pop("untrained", None)
    if not needs_model and checks - {"5"}:
        results["untrained"] = True
    elif checks - {"5"}:
        if args.load_model:
            record = load_model_file(agent, args.load_model, optimizer=args.resume)
            print(f"[bench_ai] loaded {args.load_model} ({record.get('updates', '?')} updates)", flush=True)
            if args.resume:
                results["train"] = train(agent, train_buf, args, previous=record)
                save_model_file(agent, results["train"], args.save_model)
            elif "free_energy" in record:
                results["train"] = record
            else:  # a file saved outside this script: no training curve to report
                results.pop("train", None)
                results["loaded_train"] = record
        else:
            results["train"] = train(agent, train_buf, args)
            if args.save_model:
                save_model_file(agent, results["train"], args.save_model)
        if "train" in results:
            plot_free_energy(results["train"], fig_dir / "free_energy.png")
    agent.eval()
    if "1" in checks:
        results["check1"] = one_step_mse(agent, heldout, args)
        print(f"[bench_ai] check 1: {results['check1']}", flush=True)
        results["strip"] = imagined_strip(agent, heldout, args, fig_dir / "imagined.png")
    if "2" in checks:
        results["check2"] = scorer_ranking(agent, heldout, args)
        print(f"[bench_ai] check 2: {results['check2']}", flush=True)
        if args.rank_horizon > 1:
            results["check2_multistep"] = scorer_ranking(agent, heldout, args, horizon=args.rank_horizon)
            print(f"[bench_ai] check 2, H = {args.rank_horizon}: {results['check2_multistep']}", flush=True)
    if "3" in checks and args.goals > 0:
        results["check3"] = goal_reaching(agent, heldout, args)
        plot_goal_curves(results["check3"], fig_dir / "goal_reaching.png")
        plot_efe_terms(results["check3"], fig_dir / "efe_terms.png")
    if "latency" in checks and args.latency_presets:
        results["latency"] = step_latency(agent, args)
    if "5" in checks:
        results["check5"] = epistemic_check(args, config, heldout)
    results["total_seconds"] = time.perf_counter() - t0
    (fig_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_report_page(args.out, report(args, results, argv))  # keeps the page's hand-written part
    print(f"[bench_ai] done in {results['total_seconds']:.0f} s: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
