"""Does the still goal frame ask the planner to stop short of the goal? (issue 14)

    python docs/bench_active_inference/goal_motion.py --task point_mass-easy_visible --episode-length 250 \
        --train-episodes 200 --data <buffers> --load-model <model.pt> --goals 50 --threads 1 --seed 1 \
        [--set ...] --fig-dir <dir> [--motions 16] [--no-closed-loop]

Takes the options of scripts/bench_active_inference.py (the model's settings and buffers). A goal image is one
frame, tiled over the frame stack (``ActiveInferenceAgent.infer_task``): a body at rest. Once the belief reads the
velocity, q(s|o_goal) asks for rest as well as for the place, and the planner's risk (summed over the plan's steps)
weighs "be there" against "be still". On check 3's own goals and start states (``bench.goal_cases`` and
``bench.goal_env``, as check 3 draws them; point_mass only):

1. **The risk of arriving against the risk of stopping short.** At each goal position, ``--motions`` moving stacks
   are rendered: the newest frame at the goal, the previous one displaced back by the step of a held-out
   transition (``pos_{t+1} - pos_t``, drawn from the held-out episodes: the motions of random actions). Each is
   encoded and scored by the planner's latent risk ``KL(q(s|o) || q(s|o_goal))`` (summed over the latent). Beside
   them, still stacks at distances ``d`` from the goal, on the line back toward the episode's start, are scored
   the same way. Where arriving with a typical motion costs more than standing at 0.05-0.1 from the goal, an argmin
   planner prefers to stand off. The same readings for ``||mu - mu_goal||^2`` (no goal precision).
2. **Goal reaching with a preference for the place alone** (skipped with ``--no-closed-loop``). The agent (the
   model's planner settings, check 3's argmin) runs from check 3's starts, with the same seeds, under three
   preferences: ``still``, ``q(s|o_goal)`` of the tiled frame (what check 3 uses; this reproduces its agent row);
   and ``any_motion``, the moment-matched mixture of the moving beliefs of part 1 at the goal position (mean of
   their means; variance = mean of their variances + variance of their means). That preference wants the place
   and is broad along whatever the motions change; and ``data_motion``, the same without a renderer: the still
   goal belief shifted and widened by what motion does to beliefs in the training data (:func:`data_motion`, the
   mean and variance of ``mu(stack) - mu(its newest frame tiled)``). Also run: uniform-random and zero actions
   (check 3's baselines). If ``any_motion`` reaches the goals that ``still`` stops short of, the still goal's rest
   is what held the planner back.

Writes ``goal_motion.json`` and (with part 2) ``goal_motion.png``, the mean distance curves, to ``--fig-dir``.
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

from latentrl.agents.base import Task, UniformRandomPolicy  # noqa: E402
from latentrl.world_models.active_inference import still_stack  # noqa: E402

DISTANCES = (0.0, 0.025, 0.05, 0.1, 0.2)  # still stacks this far from the goal, toward the start


def held_out_steps(heldout, motions: int, seed: int) -> torch.Tensor:
    """``motions`` held-out transitions' position steps ``pos_{t+1} - pos_t`` ``[M, 2]`` and next velocities
    ``[M, 2]`` (point_mass's physics is ``[x, y, vx, vy]``)."""
    with bench.fixed_draws(seed + 700):
        batch = heldout.sample(motions, keys=["physics"])
    now, nxt = batch["physics"].double(), batch["next", "physics"].double()
    return nxt[:, :2] - now[:, :2], nxt[:, 2:4]


def render_stack(env, previous: torch.Tensor, newest: torch.Tensor, frame_stack: int) -> torch.Tensor:
    """The stacked frames ``[N, 3 k, H, W]`` of a body at ``previous`` then at ``newest`` (physics ``[N, P]``):
    ``k - 1`` copies of the previous frame, the newest last (as the buffer stacks them)."""
    before = env.set_physics_state(previous)["pixels"]
    after = env.set_physics_state(newest)["pixels"]
    return torch.cat([before] * (frame_stack - 1) + [after], dim=1)


def risk_readings(mean: torch.Tensor, std: torch.Tensor, goal_mean: torch.Tensor,
                  goal_std: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the latent risk ``KL(N(mean, std) || N(goal_mean, goal_std))`` summed over the latent, and the
    squared distance of the means."""
    kl = bench.gaussian_kl(mean, std, goal_mean, goal_std)
    return kl.cpu().numpy(), (mean - goal_mean).square().sum(-1).cpu().numpy()


@torch.no_grad()
def motion_beliefs(env, wm, goal_physics: torch.Tensor, steps: torch.Tensor, velocities: torch.Tensor,
                   frame_stack: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The beliefs ``[M, N, D]`` (means, stds) of the body at each goal position moving by each of ``steps``
    ``[M, 2]``: the previous frame at ``goal - step``, the newest at the goal with velocity ``velocities[m]``."""
    means, stds = [], []
    for step, velocity in zip(steps, velocities, strict=True):
        newest = goal_physics.clone()
        newest[:, 2:4] = velocity.to(newest.dtype)
        previous = newest.clone()
        previous[:, :2] = newest[:, :2] - step.to(newest.dtype)
        mean, std = wm.posterior(render_stack(env, previous, newest, frame_stack))
        means.append(mean)
        stds.append(std)
    return torch.stack(means), torch.stack(stds)


def mixture(means: torch.Tensor, stds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The moment-matched Gaussian ``[N, D]`` of the equal-weight mixture of ``N(means[m], stds[m])``
    (``[M, N, D]``): mean of the means; variance = mean of the variances + variance of the means."""
    mean = means.mean(0)
    var = stds.square().mean(0) + means.var(0, unbiased=False)
    return mean, var.sqrt()


@torch.no_grad()
def data_motion(wm, train, frame_stack: int, observations: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What motion does to the belief, over ``observations`` training observations: the mean and variance ``[D]``
    of ``mu(o) - mu(o's newest frame tiled)``, the belief of the stack against that of the same place at rest. A
    preference for a place at any motion that needs no renderer: ``N(mu_g + mean, sqrt(sigma_g^2 + variance))``."""
    with bench.fixed_draws(seed + 701):
        stacks = train.sample(observations, frame_stack=frame_stack, keys=["pixels"])["pixels"]
    moving = wm.posterior(stacks)[0]
    still = wm.posterior(still_stack(stacks, wm.obs_shape[0], frame_stack))[0]  # as the model's own track_motion
    change = moving - still
    return change.mean(0), change.var(0, unbiased=False)


def point_mass_record(args, study: str) -> Path:
    """Where a point_mass study writes its record, ``--fig-dir/<study>.json``; refuses another task (the studies
    move point_mass's body, physics ``[x, y, vx, vy]``), a missing ``--fig-dir`` and a record already there."""
    if args.task.split("-")[0] != "point_mass":
        raise SystemExit(f"{study}.py moves point_mass's body ([x, y, vx, vy]): --task point_mass-*")
    if args.fig_dir is None:
        raise SystemExit(f"{study}.py writes {study}.json into --fig-dir: give one")
    out_path = Path(args.fig_dir) / f"{study}.json"
    if out_path.exists():
        raise SystemExit(f"{out_path} exists: give another --fig-dir (nothing was overwritten)")
    return out_path


def quartiles(values: np.ndarray) -> list[float]:
    """The 25th, 50th and 75th percentiles of ``values`` (over goals, or over goals and motions)."""
    return [float(v) for v in np.percentile(values, [25, 50, 75])]


@torch.no_grad()
def main(argv=None) -> dict:
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the rest are the benchmark's options
    own.add_argument("--motions", type=int, default=16, help="held-out motions rendered at each goal position")
    own.add_argument("--no-closed-loop", action="store_true", help="part 1 only (no goal-reaching runs)")
    own.add_argument("--data-observations", type=int, default=2048,
                     help="training observations behind the data_motion preference")
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    if mine.motions < 2:
        raise SystemExit("--motions: at least 2 (the any_motion preference's variance needs a spread)")
    args = bench.parse_args(rest)
    out_path = point_mass_record(args, "goal_motion")
    torch.set_num_threads(args.threads)
    task = bench.get_task(args.task)
    train, heldout = bench.load_or_collect(args)
    agent = bench.load_saved_agent(args)
    wm, k = agent.world_model, agent.frame_stack
    started = time.time()
    goal_physics, goal_pos = bench.goal_cases(args, heldout)
    steps, velocities = held_out_steps(heldout, mine.motions, args.seed)
    out = {"model": args.load_model, "goals": args.goals, "motions": mine.motions,
           "step_length": quartiles(steps.norm(dim=-1).numpy())}

    env = bench.goal_env(args)
    try:
        start_physics = env.reset()["physics"].clone()
        goal_physics = goal_physics.to(start_physics.dtype)
        still_goal = goal_physics.clone()
        still_goal[:, 2:4] = 0.0
        goal_mean, goal_std = wm.posterior(env.set_physics_state(still_goal)["pixels"].repeat(1, k, 1, 1))
        # 1. arriving with each held-out motion, against standing still short of the goal
        moving_mean, moving_std = motion_beliefs(env, wm, goal_physics, steps, velocities, k)
        readings = [risk_readings(m, s, goal_mean, goal_std) for m, s in zip(moving_mean, moving_std, strict=True)]
        moving_risk = np.stack([r for r, _ in readings])  # [M, N]
        moving_distance = np.stack([d for _, d in readings])
        toward_start = torch.as_tensor(task.body_position(start_physics.cpu().numpy()) - goal_pos)
        toward_start = toward_start / toward_start.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        still = {}
        for d in DISTANCES:
            pose = still_goal.clone()
            pose[:, :2] = still_goal[:, :2] + d * toward_start.to(pose.dtype)
            mean, std = wm.posterior(env.set_physics_state(pose)["pixels"].repeat(1, k, 1, 1))
            risk, distance = risk_readings(mean, std, goal_mean, goal_std)
            still[str(d)] = {"risk": quartiles(risk), "latent_distance": quartiles(distance),
                             # per goal: does arriving with the median motion cost more than standing here?
                             "arriving_costs_more": float(np.mean(np.median(moving_risk, 0) > risk)),
                             "arriving_costs_more_by_distance": float(np.mean(np.median(moving_distance, 0)
                                                                              > distance))}
        out["arriving"] = {"risk": quartiles(moving_risk), "latent_distance": quartiles(moving_distance)}
        out["still"] = still
        print(f"[goal_motion] risk arriving with a held-out motion (quartiles): {out['arriving']['risk']}",
              flush=True)
        for d, r in still.items():
            print(f"[goal_motion] still at {d} from the goal: risk {r['risk']}; arriving costs more for "
                  f"{r['arriving_costs_more']:.2f} of the goals", flush=True)

        # 2. goal reaching under the still preference and under the place-only one
        if not mine.no_closed_loop:
            any_mean, any_std = mixture(moving_mean, moving_std)
            out["any_motion_std_over_still_std"] = quartiles((any_std / goal_std).flatten().numpy())
            shift, spread = data_motion(wm, train, k, mine.data_observations, args.seed)
            data_mean, data_std = goal_mean + shift, (goal_std.square() + spread).sqrt()
            out["data_motion_std_over_still_std"] = quartiles((data_std / goal_std).flatten().numpy())
            preferences = {"still": (goal_mean, goal_std), "any_motion": (any_mean, any_std),
                           "data_motion": (data_mean, data_std)}
            runs = {}
            for name in ("still", "any_motion", "data_motion", "random", "zero"):
                env.close()  # each run in a fresh env whose reset gives the same starts, as check 3 runs them
                env = bench.goal_env(args)
                env.reset()
                td = env.set_physics_state(start_physics)
                if name in preferences:
                    policy = agent.policy(Task(z=torch.cat(preferences[name], -1), info={"kind": "goal"}))
                    policy.eval()
                elif name == "random":
                    policy = UniformRandomPolicy(agent.action_dim, torch.Generator().manual_seed(args.seed + 4))
                else:
                    policy = bench.ZeroPolicy(agent.action_dim)
                torch.manual_seed(args.seed + 5)  # as check 3 seeds its runs
                clock = time.perf_counter()
                run = bench.goal_episodes(env, td, policy, args.goal_steps, task, goal_pos)
                dist = run["distance"]
                runs[name] = {"success": float(np.mean(dist[-1] < args.success_radius)),
                              "mean_distance": float(dist[-1].mean()), "final_distance": dist[-1].tolist(),
                              "mean_distance_curve": dist.mean(1).tolist(),
                              "seconds": time.perf_counter() - clock}
                print(f"[goal_motion] goals, {name}: success {runs[name]['success']:.2f}, mean final distance "
                      f"{runs[name]['mean_distance']:.3f}", flush=True)
            out["goal_reaching"] = runs
    finally:
        env.close()
    out["seconds"] = time.time() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    if "goal_reaching" in out:
        plot_runs(out["goal_reaching"], out_path.with_suffix(".png"),
                  f"{args.load_model}, H = {agent.config.plan_horizon}")
    print(f"[goal_motion] wrote {out_path} ({out['seconds']:.0f} s)", flush=True)
    return out


def plot_runs(runs: dict, path: Path, title: str = "") -> None:
    """The mean distance to the goals after every step of each goal-reaching run, with the success radius."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in runs.items():
        style = {"linestyle": "--", "color": "grey" if name == "random" else "black"} if name in ("random", "zero") \
            else {}
        curve = run["mean_distance_curve"]
        ax.plot(range(1, len(curve) + 1), curve, label=f"{name} (success {run['success']:.2f})", **style)
    ax.axhline(0.05, color="green", linewidth=0.8, label="success radius")
    ax.set_xlabel("agent step")
    ax.set_ylabel("mean distance to the goal (50 goals)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
