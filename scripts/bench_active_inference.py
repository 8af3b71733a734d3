#!/usr/bin/env python
"""Small-scale benchmark of the deep active inference agent (issue 14; spec
``shared/algorithms/active_inference.md`` §8 and §10 checks 1-3) on point_mass-easy, 64x64 pixels.

    python scripts/bench_active_inference.py                 # the default run (~15 min on 2 CPU cores)
    python scripts/bench_active_inference.py --quick --out /tmp/ai.md --fig-dir /tmp/ai

1. Collects ``--train-episodes`` uniform-random-action episodes (``--episode-length`` steps, action
   repeat 4) into a ``ReplayBuffer``, and ``--heldout-episodes`` more (another seed) for testing.
2. Trains the agent's world model by ``agent.update(buffer.sample(**agent.sample_spec().sample_kwargs()))``
   for ``--updates`` updates or ``--train-seconds`` seconds, whichever comes first, logging the free energy.
3. On the held-out episodes:
   - check 1: the one-step prediction MSE of ``decode(E[p(s'|s,a)])`` (the ensemble members' mean from
     the posterior mean of o_t) against the copy-current-frame baseline, per pixel in ``x / 255 - 0.5``
     units; and whether the smoothed free-energy curve decreases;
   - check 2: for ``--rank-cases`` held-out (o_t, a_t, o_{t+1}) with the goal set to o_{t+1}, the rank
     of the true a_t among ``--rank-candidates`` uniform random one-step candidates by the agent's G
     (``ActiveInferencePolicy.score``, i.e. ``expected_free_energy`` on imagined one-step outcomes);
     target: in the best 20% in >= 80% of cases;
   - check 3: goal reaching from ``--goals`` goal images (physics states sampled from the held-out
     data, rendered with ``env.set_physics_state``) in ``--goal-steps`` steps, with the agent's
     policy vs uniform-random and zero-action policies: success (final distance < ``--success-radius``)
     and mean final distance. Target: success >= both baselines + 20 points, lower mean distance.

Writes a markdown report to ``--out``, ``results.json``, ``free_energy.png`` and ``imagined.png`` (real
vs open-loop imagined frames of one held-out sequence) under ``--fig-dir``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from latentrl.agents.active_inference import ActiveInferenceAgent
from latentrl.agents.base import GoalObservation, Policy, UniformRandomPolicy
from latentrl.envs import get_task, make_env
from latentrl.replay import ReplayBuffer
from latentrl.training.evaluation import rollout
from latentrl.training.logger import machine_description

ROOT = Path(__file__).resolve().parents[1]


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
    p.add_argument("--mse-cases", type=int, default=1000, help="held-out transitions for check 1")
    p.add_argument("--rank-cases", type=int, default=100)
    p.add_argument("--rank-candidates", type=int, default=1000)
    p.add_argument("--goals", type=int, default=20)
    p.add_argument("--goal-steps", type=int, default=50)
    p.add_argument("--success-radius", type=float, default=0.05)
    p.add_argument("--strip-steps", type=int, default=8, help="steps of the real vs imagined strip")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_active_inference.md"))
    p.add_argument("--fig-dir", default=str(ROOT / "docs" / "bench_active_inference"))
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long run for tests: smoke preset, tiny data, few updates and cases")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "smoke"
        args.train_episodes, args.heldout_episodes, args.episode_length, args.num_envs = 2, 1, 12, 2
        args.updates, args.train_seconds, args.log_every = 6, 30.0, 1
        args.mse_cases, args.rank_cases, args.rank_candidates = 16, 4, 20
        args.goals, args.goal_steps, args.strip_steps = 2, 3, 3
    return args


def parse_overrides(items: list[str]) -> dict:
    """``["obs_std=0.1", "planner=cem"]`` -> typed ActiveInferenceConfig overrides."""
    fields = ActiveInferenceAgent.config_class.__dataclass_fields__
    defaults = ActiveInferenceAgent.config_class()
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        kind = type(getattr(defaults, key))
        out[key] = value if kind is str else kind(float(value)) if kind is int else kind(value)
    return out


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


def train(agent: ActiveInferenceAgent, buffer: ReplayBuffer, args) -> dict:
    kwargs = agent.sample_spec().sample_kwargs()
    curve, steps = [], []
    start = time.perf_counter()
    updates = 0
    while updates < args.updates and time.perf_counter() - start < args.train_seconds:
        metrics = agent.update(buffer.sample(**kwargs))
        updates += 1
        if updates % args.log_every == 0 or updates == 1:
            curve.append(metrics["free_energy"])
            steps.append(updates)
            if updates % (args.log_every * 20) == 0:
                print(f"[bench_ai] update {updates}: free energy {metrics['free_energy']:.1f} "
                      f"(recon {metrics['recon']:.1f}, kl_transition {metrics['kl_transition']:.2f}, "
                      f"epistemic {metrics['epistemic']:.3f}), {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    sm = smooth(curve, max(1, len(curve) // 10))
    # "decreases monotonically (smoothed)": the smoothed curve read at 10 evenly spaced points
    marks = sm[np.linspace(0, len(sm) - 1, min(10, len(sm))).round().astype(int)]
    return {"updates": updates, "seconds": seconds, "seconds_per_update": seconds / max(updates, 1),
            "sample_kwargs": {k: v for k, v in kwargs.items() if v is not None},
            "free_energy_steps": steps, "free_energy": curve,
            "free_energy_first_smoothed": float(sm[0]), "free_energy_last_smoothed": float(sm[-1]),
            "smoothed_marks": marks.tolist(),
            "smoothed_monotone": bool(np.all(np.diff(marks) <= 0))}


# ----------------------------------------------------------------------------------------- checks


@torch.no_grad()
def one_step_mse(agent: ActiveInferenceAgent, heldout: ReplayBuffer, args) -> dict:
    """Check 1: MSE of decode(E[p(s'|s,a)]) vs o_{t+1}, and of the copy-current-frame baseline."""
    wm = agent.world_model
    batch = heldout.sample(args.mse_cases, frame_stack=agent.frame_stack, keys=["pixels"])
    mean, _ = wm.posterior(batch["pixels"])
    means, _ = wm.transition_members(mean, batch["action"].float())
    pred = wm.decode_mean(means.mean(0))
    target = wm.target(batch["next", "pixels"])
    model = (pred - target).square().mean().item()
    copy = (wm.target(batch["pixels"]) - target).square().mean().item()
    recon = (wm.decode_mean(wm.posterior(batch["next", "pixels"])[0]) - target).square().mean().item()
    return {"cases": args.mse_cases, "model_mse": model, "copy_frame_mse": copy, "reconstruction_mse": recon,
            "pass": model < copy}


@torch.no_grad()
def scorer_ranking(agent: ActiveInferenceAgent, heldout: ReplayBuffer, args) -> dict:
    """Check 2: rank of the true a_t among random one-step candidates by G, with the goal o_{t+1}."""
    batch = heldout.sample(args.rank_cases, frame_stack=agent.frame_stack, keys=["pixels"])
    task = agent.infer_task(GoalObservation(obs=TensorDict({"pixels": batch["next", "pixels"]},
                                                           batch_size=[args.rank_cases])))
    policy = agent.policy(task)
    wm = agent.world_model
    state = wm.observe(wm.initial_state(args.rank_cases), batch["pixels"], None, None)
    n, k = args.rank_cases, args.rank_candidates
    gen = torch.Generator().manual_seed(args.seed + 1)
    candidates = torch.rand(n, k, 1, wm.action_dim, generator=gen) * 2 - 1
    actions = torch.cat([batch["action"].float().reshape(n, 1, 1, -1), candidates], dim=1)  # true action first
    goal_mean, goal_std = policy._goal(n)
    terms = policy.score(state, actions, goal_mean, goal_std)
    out = {"cases": n, "candidates": k}
    # G as computed adds the constant ambiguity (~1.7e4 nats for 64x64x3 pixels), which rounds float32 G
    # values into ties; "G_nonconstant" = risk - epistemic_weight * epistemic ranks the same way without it.
    terms["G_nonconstant"] = terms["risk"] - agent.config.epistemic_weight * terms["epistemic"]
    for name in ("G_nonconstant", "G", "risk"):
        g = terms[name]
        # the fraction of random candidates scored better, ties counted half (mid-rank)
        rank = ((g[:, 1:] < g[:, :1]).float() + 0.5 * (g[:, 1:] == g[:, :1]).float()).mean(1)
        out[f"{name}_fraction_in_best_20pct"] = float((rank < 0.2).float().mean())
        out[f"{name}_median_rank"] = float(rank.median())
    out["pass"] = out["G_nonconstant_fraction_in_best_20pct"] >= 0.8
    return out


def goal_reaching(agent: ActiveInferenceAgent, heldout: ReplayBuffer, args) -> dict:
    """Check 3: success and final distance from ``--goals`` goal images for the agent, random and zero actions."""
    task = get_task(args.task)
    torch.manual_seed(args.seed + 2)
    goal_physics = heldout.sample(args.goals, keys=["physics"])["physics"]
    goal_pos = task.body_position(goal_physics.cpu().numpy())
    out = {"goals": args.goals, "steps": args.goal_steps, "success_radius": args.success_radius}
    for name in ("agent", "random", "zero"):
        env = make_env(args.task, obs=("pixels", "physics"), action_repeat=args.action_repeat,
                       episode_length=args.goal_steps, num_envs=args.goals, num_workers=0, seed=args.seed + 3)
        start = time.perf_counter()
        try:
            if name == "agent":
                goal_obs = env.set_physics_state(goal_physics)
                with torch.no_grad():
                    inferred = agent.infer_task(GoalObservation(obs=goal_obs.select("pixels")))
                policy = agent.policy(inferred)
            elif name == "random":
                policy = UniformRandomPolicy(agent.action_dim, torch.Generator().manual_seed(args.seed + 4))
            else:
                policy = ZeroPolicy(agent.action_dim)
            torch.manual_seed(args.seed + 5)
            episodes = rollout(env, policy, args.goals, final_physics=True).episodes
        finally:
            env.close()
        final = torch.stack([e.final_physics for e in episodes]).cpu().numpy()
        dist = np.linalg.norm(task.body_position(final) - goal_pos, axis=-1)
        out[name] = {"success": float(np.mean(dist < args.success_radius)), "mean_distance": float(dist.mean()),
                     "seconds": time.perf_counter() - start}
        print(f"[bench_ai] goals, {name}: success {out[name]['success']:.2f}, "
              f"mean final distance {out[name]['mean_distance']:.3f}", flush=True)
    a, r, z = out["agent"], out["random"], out["zero"]
    out["pass"] = (a["success"] >= max(r["success"], z["success"]) + 0.2
                   and a["mean_distance"] < min(r["mean_distance"], z["mean_distance"]))
    return out


# ---------------------------------------------------------------------------------------- figures


def plot_free_energy(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, curve = np.asarray(result["free_energy_steps"]), np.asarray(result["free_energy"])
    window = max(1, len(curve) // 10)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot(steps, curve, lw=0.6, alpha=0.4, label="per update")
    sm = smooth(curve.tolist(), window)
    ax.plot(steps[window - 1:], sm, lw=1.5, label=f"moving average ({window} points)")
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("free energy (nats / observation)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


def report(args, results: dict, argv: list[str]) -> str:
    tr, c1, c2, c3 = results["train"], results["check1"], results["check2"], results.get("check3")
    cfg = results["config"]
    lines = [
        "# Deep active inference: small-scale benchmark (issue 14)",
        "",
        f"- Date: {results['date']}; machine: {results['machine']}.",
        f"- Command: `python scripts/bench_active_inference.py {' '.join(argv)}`"
        f" (total {results['total_seconds'] / 60:.1f} min).",
        f"- Task: {args.task}, 64x64 pixels, action repeat {args.action_repeat}, frame stack {cfg['frame_stack']}.",
        f"- Data: {args.train_episodes} training + {args.heldout_episodes} held-out (another seed) uniform-random "
        f"episodes x {args.episode_length} steps ({results['collect_seconds']:.0f} s to collect).",
        f"- Agent: preset `{args.preset}`{' with ' + ', '.join(args.overrides) if args.overrides else ''} "
        f"(latent {cfg['latent_dim']}, ensemble {cfg['ensemble_size']}, batch {cfg['batch_size']}, "
        f"lr {cfg['lr']}, obs_std {cfg['obs_std']}, planner {cfg['planner']} K={cfg['num_candidates']} "
        f"x {cfg['cem_iterations']} rounds, H={cfg['plan_horizon']}, J={cfg['num_samples']}).",
        f"- Training: {tr['updates']} updates in {tr['seconds']:.0f} s ({tr['seconds_per_update']:.2f} s/update; "
        f"budget {args.updates} updates or {args.train_seconds:.0f} s).",
        "",
        "## Results",
        "",
        "| check | measured | target | pass |",
        "|---|---|---|---|",
        f"| 1. one-step prediction MSE (per pixel, [-0.5, 0.5] scale, {c1['cases']} held-out transitions) | "
        f"model {c1['model_mse']:.5f} vs copy-frame {c1['copy_frame_mse']:.5f} (reconstruction "
        f"{c1['reconstruction_mse']:.5f}) | model < copy | {'yes' if c1['pass'] else 'no'} |",
        f"| 1. free energy, smoothed | {tr['free_energy_first_smoothed']:.1f} -> "
        f"{tr['free_energy_last_smoothed']:.1f}; "
        f"monotone at 10 marks: {'yes' if tr['smoothed_monotone'] else 'no'} | decreasing | "
        f"{'yes' if tr['smoothed_monotone'] else 'no'} |",
        f"| 2. true a_t in best 20% of {c2['candidates']} random candidates by G ({c2['cases']} cases) | "
        f"{c2['G_nonconstant_fraction_in_best_20pct']:.2f} (median rank {c2['G_nonconstant_median_rank']:.2f}; "
        f"G with the constant ambiguity in float32, ties mid-ranked: {c2['G_fraction_in_best_20pct']:.2f}; "
        f"risk only {c2['risk_fraction_in_best_20pct']:.2f}) | >= 0.80 | {'yes' if c2['pass'] else 'no'} |",
    ]
    if c3 is not None:
        a, r, z = c3["agent"], c3["random"], c3["zero"]
        lines.append(
            f"| 3. goal reaching, {c3['goals']} goals x {c3['steps']} steps: success (< {c3['success_radius']}) / "
            f"mean final distance | agent {a['success']:.2f} / {a['mean_distance']:.3f}; random "
            f"{r['success']:.2f} / {r['mean_distance']:.3f}; zero {z['success']:.2f} / {z['mean_distance']:.3f} | "
            f"agent >= both + 0.20, lower distance | {'yes' if c3['pass'] else 'no'} |")
    strip = results["strip"]
    lines += [
        "",
        f"Open-loop imagination MSE per step over {strip['steps']} steps (per pixel, [0, 1] scale): "
        + ", ".join(f"{v:.4f}" for v in strip["open_loop_mse_per_step"]) + ".",
        "",
        "![free energy](bench_active_inference/free_energy.png)",
        "",
        "![real (top) vs open-loop imagined (bottom) frames](bench_active_inference/imagined.png)",
        "",
        "Raw numbers: `bench_active_inference/results.json`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    fig_dir = Path(args.fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    train_buf = collect(args, args.train_episodes, args.seed)
    heldout = collect(args, args.heldout_episodes, args.seed + 1000)
    collect_seconds = time.perf_counter() - t0
    print(f"[bench_ai] collected {len(train_buf)} + {len(heldout)} steps in {collect_seconds:.0f} s", flush=True)
    config = ActiveInferenceAgent.make_config(args.preset, obs_type="pixels", **parse_overrides(args.overrides))
    agent = ActiveInferenceAgent(config, (3, 64, 64), 2)
    results = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine_description("cpu"), "args": vars(args), "collect_seconds": collect_seconds,
               "config": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    results["train"] = train(agent, train_buf, args)
    agent.eval()
    results["check1"] = one_step_mse(agent, heldout, args)
    print(f"[bench_ai] check 1: {results['check1']}", flush=True)
    results["check2"] = scorer_ranking(agent, heldout, args)
    print(f"[bench_ai] check 2: {results['check2']}", flush=True)
    results["strip"] = imagined_strip(agent, heldout, args, fig_dir / "imagined.png")
    plot_free_energy(results["train"], fig_dir / "free_energy.png")
    if args.goals > 0:
        results["check3"] = goal_reaching(agent, heldout, args)
    results["total_seconds"] = time.perf_counter() - t0
    (fig_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    Path(args.out).write_text(report(args, results, argv))
    print(f"[bench_ai] done in {results['total_seconds']:.0f} s: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
