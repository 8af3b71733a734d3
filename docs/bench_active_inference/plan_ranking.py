"""Does the planner's G rank plans by where they truly take the body? (issue 14)

    python docs/bench_active_inference/plan_ranking.py --task point_mass-easy_visible --episode-length 250 \
        --train-episodes 200 --data <buffers> --load-model <model.pt> --goals 50 --threads 1 --seed 1 \
        [--set ...] --fig-dir <dir> [--candidates 200]

Takes the options of scripts/bench_active_inference.py (the model's settings and buffers). Check 3 asks the planner
to bring the body to a goal; when it fails, either the objective it minimises (the model's imagined rollouts
scored by the risk) does not order plans by where they take the body, or the search (CEM, closed loop) does not
find the plans it orders first. This script reads the first. On check 3's own goals and start states
(``bench.goal_cases``, ``bench.goal_env``; point_mass), ``--candidates`` uniform random action sequences of the
planner's horizon are

- executed in the simulator from each start: the body's true distance to the goal after the sequence;
- scored as the planner scores them at its first step (``ActiveInferencePolicy.score`` from the belief of the
  start's tiled frame, with one set of draws shared by the candidates, and ``plan_value``), under three
  preferences: ``still`` (q(s|o_goal) of the tiled goal frame, check 3's), ``any_motion`` (the model's motion
  statistics, ``goal_motion="any"``, when it has them) and ``unit_precision`` (the goal mean with a unit std);
- and by ``latent_distance``: the ensemble's mean prediction rolled from the belief's mean, its squared distance
  to the goal belief's mean summed over the horizon (no precision, no sampling: every latent dimension alike).

Per goal: Spearman's rho between the score and the true final distance over the candidates, and where the
score's best candidate lies among the true distances (its percentile: 0 is the truly best plan, 0.5 the median of
random ones); and where the plan that does nothing lies, for reference. Before that, whether the transition knows
the action at all (:func:`action_effect`: its one-step prediction of held-out beliefs under the true action against
zero, another and the negated action). Writes ``plan_ranking.json`` to ``--fig-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goal_motion import point_mass_record  # noqa: E402
from risk_along_paths import average_ranks, spearman  # noqa: E402

from latentrl.agents.active_inference import plan_value  # noqa: E402
from latentrl.agents.base import Task  # noqa: E402
from latentrl.envs import make_env  # noqa: E402


def true_distances(args, start_physics: torch.Tensor, actions: torch.Tensor, goal_pos: np.ndarray) -> np.ndarray:
    """The body's distance to each goal after executing each candidate ``actions`` ``[N, K, H, A]`` from
    ``start_physics`` ``[N, S]`` in the simulator: ``[N, K]``."""
    task = bench.get_task(args.task)
    n, k, h, _ = actions.shape
    env = make_env(args.task, obs=("pixels", "physics"), action_repeat=args.action_repeat,
                   episode_length=k * h + 2, num_envs=n, num_workers=0, seed=args.seed + 800)
    try:
        env.reset()
        out = np.zeros((n, k))
        for j in range(k):
            td = env.set_physics_state(start_physics)
            for t in range(h):
                td["action"] = actions[:, j, t]
                td = env.step(td)["next"]
            out[:, j] = np.linalg.norm(task.body_position(td["physics"].cpu().numpy()) - goal_pos, axis=-1)
    finally:
        env.close()
    return out


@torch.no_grad()
def action_effect(wm, heldout, frame_stack: int, cases: int, seed: int) -> dict:
    """Does the transition know what the action does to the belief? On ``cases`` held-out transitions: the
    squared distance ``||E_members mu'(mu_t, a) - mu_{t+1}||^2`` (summed over the latent, averaged over cases) of
    the ensemble's mean prediction from the belief's mean to the next belief's mean, under the true ``a_t``, zero,
    another case's action and the negated one; and the distance of the current belief itself (``copy``)."""
    with bench.fixed_draws(seed + 802):
        batch = heldout.sample(cases, frame_stack=frame_stack, keys=["pixels"])
    now, nxt = wm.posterior(batch["pixels"])[0], wm.posterior(batch["next"]["pixels"])[0]
    action = batch["action"].float()
    other = action[torch.randperm(len(action), generator=torch.Generator().manual_seed(seed + 803))]
    out = {"copy": float((now - nxt).square().sum(-1).mean())}
    for name, a in (("true", action), ("zero", torch.zeros_like(action)), ("other", other), ("negated", -action)):
        out[name] = float((wm.transition_members(now, a)[0].mean(0) - nxt).square().sum(-1).mean())
    return out


def candidate_ranks(x: np.ndarray) -> np.ndarray:
    """Each goal's ranks of its candidates ``[N, K]`` from 0, ties sharing the mean of their ranks
    (``risk_along_paths.average_ranks``, which ranks along the first axis)."""
    return average_ranks(x.T).T


def ranking(score: np.ndarray, truth: np.ndarray) -> dict:
    """Per goal (rows of ``score``, ``truth`` ``[N, K]``, lower is better for both): Spearman's rho, and the
    percentile among the true distances of the score's best candidate (0: the truly best; ties mid-ranked)."""
    with np.errstate(invalid="ignore"):  # a score tying all its candidates ranks nothing: rho 0
        rho = np.nan_to_num(spearman(score.T, truth.T))
    truth_ranks = candidate_ranks(truth)
    best = score.argmin(-1)
    k = truth.shape[1]
    percentile = truth_ranks[np.arange(len(truth)), best] / (k - 1)
    return {"rho": rho.tolist(), "median_rho": float(np.median(rho)), "best_percentile": percentile.tolist(),
            "median_best_percentile": float(np.median(percentile)),
            "best_in_best_20pct": float(np.mean(percentile <= 0.2))}


@torch.no_grad()
def main(argv=None) -> dict:
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the rest are the benchmark's options
    own.add_argument("--candidates", type=int, default=200, help="random action sequences per goal")
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    if mine.candidates < 2:
        raise SystemExit("--candidates: at least 2")
    args = bench.parse_args(rest)
    out_path = point_mass_record(args, "plan_ranking")
    torch.set_num_threads(args.threads)
    _, heldout = bench.load_or_collect(args)
    agent = bench.load_saved_agent(args)
    wm, cfg, k = agent.world_model, agent.config, agent.frame_stack
    started = time.time()
    goal_physics, goal_pos = bench.goal_cases(args, heldout)
    env = bench.goal_env(args)
    try:
        start_physics = env.reset()["physics"].clone()
        goal_frames = env.set_physics_state(goal_physics)["pixels"]
        start_frames = env.set_physics_state(start_physics)["pixels"]
    finally:
        env.close()
    n, h, a = len(goal_pos), cfg.plan_horizon, agent.action_dim
    gen = torch.Generator().manual_seed(args.seed + 801)
    actions = torch.rand(n, mine.candidates, h, a, generator=gen) * 2 - 1
    actions[:, 0] = 0.0  # the first candidate does nothing
    truth = true_distances(args, start_physics, actions, goal_pos)
    start_stack = start_frames.repeat(1, k, 1, 1)
    state = wm.observe(wm.initial_state(n), start_stack, None, None)
    goal_mean, goal_std = wm.posterior(goal_frames.repeat(1, k, 1, 1))
    preferences = {"still": (goal_mean, goal_std), "unit_precision": (goal_mean, torch.ones_like(goal_std))}
    if wm.motion is not None and wm.motion.batches > 0:
        preferences["any_motion"] = wm.motion.widen(goal_mean, goal_std)
    start_distance = np.linalg.norm(bench.get_task(args.task).body_position(start_physics.cpu().numpy()) - goal_pos,
                                    axis=-1)
    effect = action_effect(wm, heldout, k, 2000, args.seed)
    print(f"[plan_ranking] one-step latent prediction error by action: {json.dumps(effect)}", flush=True)
    out = {"model": args.load_model, "goals": n, "candidates": mine.candidates, "horizon": h, "action_effect": effect,
           "start_distance": start_distance.tolist(), "true_distance": truth.tolist(),
           "true_distance_quartiles": [float(v) for v in np.percentile(truth - start_distance[:, None], [25, 50, 75])],
           # where doing nothing lies among the true outcomes (median over goals)
           "zero_plan_percentile": float(np.median(candidate_ranks(truth)[:, 0] / (mine.candidates - 1)))}
    for name, (mean, std) in preferences.items():
        policy = agent.policy(Task(z=torch.cat([mean, std], -1), info={"kind": "goal"}))
        policy.eval()
        gens = [torch.Generator().manual_seed(args.seed * 1000 + i) for i in range(n)]
        draws = policy.draw_noise(n, h, gens)
        terms = policy.score(state, actions, mean, std, draws=draws, context=start_stack[:, -3 * (k - 1):])
        value = plan_value(terms, cfg.epistemic_weight).cpu().numpy()
        out[name] = ranking(value, truth)
        print(f"[plan_ranking] {name}: median rho {out[name]['median_rho']:.2f}, the best-scored plan's true "
              f"percentile (median) {out[name]['median_best_percentile']:.2f}, in the best 20% for "
              f"{out[name]['best_in_best_20pct']:.2f} of the goals", flush=True)
    # a scorer without the goal's precision or sampling: the ensemble's mean prediction rolled from the belief's
    # mean, its squared distance to the goal's mean summed over the horizon
    s, cost = state["mean"].repeat_interleave(mine.candidates, 0), 0.0
    for t in range(h):
        s = wm.transition_members(s, actions[:, :, t].flatten(0, 1))[0].mean(0)
        cost = cost + (s - goal_mean.repeat_interleave(mine.candidates, 0)).square().sum(-1)
    out["latent_distance"] = ranking(cost.reshape(n, -1).cpu().numpy(), truth)
    print(f"[plan_ranking] latent_distance: median rho {out['latent_distance']['median_rho']:.2f}, best-scored "
          f"plan's true percentile (median) {out['latent_distance']['median_best_percentile']:.2f}", flush=True)
    out["seconds"] = time.time() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    print(f"[plan_ranking] wrote {out_path} ({out['seconds']:.0f} s)", flush=True)
    return out


if __name__ == "__main__":
    main()
