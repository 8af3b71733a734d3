"""Does the latent risk lead reacher's arm to far goals? The risk read along real paths (issue 14)

    python docs/bench_active_inference/risk_along_paths.py --task reacher-easy --episode-length 250 \
        --train-episodes 100 --set decoder=conv --data <buffers> --load-model <model.pt> --goals 50 \
        --fig-dir <dir> [--points 21]

Takes the options of scripts/bench_active_inference.py (the model's settings and buffers). Check 3's own 50 goals
and start poses (``bench_active_inference.goal_cases`` and ``goal_env``, as check 3 draws them) are joined by
straight paths in joint space (the shoulder along its shorter arc, it is unlimited; the wrist, limited, directly),
at ``--points`` poses from start to goal, at rest. Each pose is rendered, encoded as a still stack (the frame tiled,
as a goal image is), and scored by the planner's latent risk toward the goal, ``KL(q(s|o_pose) || q(s|o_goal))``
summed over the latent (``expected_free_energy``'s risk, at the posterior instead of a prediction). Per goal it
reads whether the risk orders the path's poses as the fingertip's distance to the goal does (Spearman rho), whether
it falls at every step of the path, and whether it falls over the first step out of the start (what a short-horizon
planner sees); split at the median start distance, as the benchmark page splits check 3's successes. The same
reading for the squared distance between the posterior means (``latent_distance``), a risk without the goal's
precision; for the observation-space risk (``risk="observation"``, AV's ``||dec(s) - o_goal||^2 / (2 obs_std^2)``) at
the pose's belief mean; and for the squared pixel distance of the pose's frame to the goal frame (what any
observation risk would read, were the model perfect).

A risk that falls steadily along the path to far goals leaves the planner's search to blame; one that is flat
or rises near the start of far paths means the planner has nothing to descend there. Writes
``risk_along_paths.json`` and ``risk_along_paths.png`` (every reading relative to its start value along the near
and far paths) to ``--fig-dir``.
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
from latent_ranking import wrap  # noqa: E402


def path_states(start: torch.Tensor, goal: torch.Tensor, alphas: torch.Tensor, joints: int,
                wrapped: tuple[int, ...]) -> torch.Tensor:
    """Physics states ``[P, N, S]`` on straight joint-space paths from ``start`` to ``goal`` ``[N, S]`` (qpos
    first, ``joints`` of them, then qvel): joints in ``wrapped`` take the shorter arc (their difference wrapped to
    [-pi, pi)), the others the direct line; velocities zero (the poses at rest); the rest of the state from
    ``start``."""
    diff = goal[:, :joints] - start[:, :joints]
    for j in wrapped:
        diff[:, j] = wrap(diff[:, j])
    states = start[None].repeat(len(alphas), 1, 1)
    states[:, :, :joints] = start[None, :, :joints] + alphas[:, None, None] * diff[None]
    states[:, :, joints : 2 * joints] = 0.0
    return states


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the first axis of ``x`` ``[P, N]`` from 0, tied values sharing the mean of their ranks."""
    def column(v):
        s = np.sort(v)
        return (np.searchsorted(s, v, "left") + np.searchsorted(s, v, "right") - 1) / 2.0
    return np.apply_along_axis(column, 0, x)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho along the first axis of ``x``, ``y`` ``[P, N]`` -> ``[N]`` (ties at their mean rank: the
    climbs of paths whose risk never rises are all 0)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx -= rx.mean(0)
    ry -= ry.mean(0)
    return (rx * ry).sum(0) / np.sqrt((rx**2).sum(0) * (ry**2).sum(0))


def near_half(start_distance: np.ndarray) -> np.ndarray:
    """The goals nearer than the median start distance (bool ``[N]``): the split every reading here uses, as the
    benchmark page splits check 3's successes; the rest are the far half."""
    return start_distance < np.median(start_distance)


def path_reading(risk: np.ndarray, distance: np.ndarray, start_distance: np.ndarray) -> dict:
    """Per goal and by half (split at the median start distance): rho between the risk and the fingertip's
    distance along the path, whether the risk falls at every step, whether it falls over the first step;
    ``risk``, ``distance`` ``[P, N]``."""
    rho = spearman(risk, distance)
    steps = np.diff(risk, axis=0)
    monotone = (steps < 0).all(0)
    first_falls = steps[0] < 0
    # a straight joint path need not bring the fingertip steadily nearer (far goals often swing it round first):
    # the risk is also read on the paths where the distance itself falls at every step
    fair = (np.diff(distance, axis=0) < 0).all(0)
    near = near_half(start_distance)
    scale = np.maximum(np.abs(risk[0]), 1e-12)
    relative = steps[0] / scale  # the first step's change in the start's risk
    rise = (risk.max(0) - risk[0]) / scale  # the highest the risk climbs above the start's on the way
    # the share of the path walked before the risk is first 10% below the start's: how long a plateau (or a
    # climb) a planner must cross before the risk says it is getting nearer (1.0: never, before the goal)
    below = risk <= risk[0] - 0.1 * scale
    plateau = np.where(below.any(0), below.argmax(0), len(risk) - 1) / (len(risk) - 1)
    out = {"rho": rho.tolist(), "monotone": monotone.tolist(), "first_step_falls": first_falls.tolist(),
           "first_step_relative": relative.tolist(), "distance_monotone": fair.tolist(), "rise": rise.tolist(),
           "plateau": plateau.tolist()}
    for name, rows in (("near", near), ("far", ~near)):
        both = rows & fair
        out[name] = {"goals": int(rows.sum()), "median_rho": float(np.median(rho[rows])),
                     "monotone": float(monotone[rows].mean()), "first_step_falls": float(first_falls[rows].mean()),
                     "median_first_step_relative": float(np.median(relative[rows])),
                     "median_rise": float(np.median(rise[rows])), "distance_monotone": int(both.sum()),
                     "median_plateau_where_distance_monotone":
                         float(np.median(plateau[both])) if both.any() else None,
                     "monotone_where_distance_monotone": float(monotone[both].mean()) if both.any() else None,
                     "first_step_falls_where_distance_monotone":
                         float(first_falls[both].mean()) if both.any() else None}
    return out


@torch.no_grad()
def main(argv=None) -> dict:
    own = argparse.ArgumentParser(add_help=False)  # the rest are the benchmark's options
    own.add_argument("--points", type=int, default=21, help="poses per path, start and goal included")
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    points = mine.points
    if points < 3:
        raise SystemExit("--points: at least 3 poses per path (start, one between, goal)")
    args = bench.parse_args(rest)
    task = bench.get_task(args.task)
    if args.task.split("-")[0] != "reacher":
        raise SystemExit("risk_along_paths.py reads reacher's two hinge joints (shoulder unlimited): --task reacher-*")
    torch.set_num_threads(args.threads)
    _, heldout = bench.load_or_collect(args)
    agent = bench.load_saved_agent(args)
    wm = agent.world_model
    started = time.time()
    goal_physics, goal_pos = bench.goal_cases(args, heldout)  # check 3's goals and (reset) start poses
    env = bench.goal_env(args)
    try:
        start_physics = env.reset()["physics"].clone()
        goal_frames = env.set_physics_state(goal_physics)["pixels"]
        goal_mean, goal_std = wm.posterior(goal_frames.repeat(1, agent.frame_stack, 1, 1))
        alphas = torch.linspace(0.0, 1.0, points, dtype=start_physics.dtype)
        states = path_states(start_physics, goal_physics.to(start_physics.dtype), alphas, joints=2, wrapped=(0,))
        goal_target = wm.target(goal_frames)  # the goal frame in the decoder's scale
        rows = torch.arange(goal_target.shape[0])
        risk, means_only, observed, decoded, distance = [], [], [], [], []
        for state in states:
            td = env.set_physics_state(state)
            mean, std = wm.posterior(td["pixels"].repeat(1, agent.frame_stack, 1, 1))
            risk.append(bench.gaussian_kl(mean, std, goal_mean, goal_std).cpu().numpy())  # summed over D
            means_only.append((mean - goal_mean).square().sum(-1).cpu().numpy())
            # the observation risk (AV's instrumental term) at the pose's own belief, and at the pose's real frame
            decoded.append(wm.observation_risk(mean[:, None], goal_target, rows)[:, 0].cpu().numpy())
            observed.append((wm.target(td["pixels"]) - goal_target).square().flatten(1).sum(-1).cpu().numpy())
            distance.append(np.linalg.norm(task.body_position(td["physics"].cpu().numpy()) - goal_pos, axis=-1))
    finally:
        env.close()
    risk, means_only, distance = np.stack(risk), np.stack(means_only), np.stack(distance)
    decoded, observed = np.stack(decoded), np.stack(observed)
    out = {"model": args.load_model, "goals": args.goals, "points": points,
           "start_distance": distance[0].tolist(), "risk": risk.T.tolist(), "distance": distance.T.tolist()}
    out.update(path_reading(risk, distance, distance[0]))
    # the same reading for the squared distance between the posterior means (no goal precision: a candidate risk
    # that weighs every latent dimension alike), for the observation-space risk (``risk="observation"``: the
    # decoded belief against the goal frame), and for the pixels themselves (the landscape any observation risk
    # would have, were the model perfect); each with its values [goal][pose], as "risk"
    for name, values in (("latent_distance", means_only), ("observation_risk", decoded),
                         ("pixel_distance", observed)):
        out[name] = {**path_reading(values, distance, distance[0]), "values": values.T.tolist()}
    # which joint's move goes with the climb: per goal the wrapped change of each joint from start to goal, and
    # Spearman's rho between its size and the risk's climb, over all goals and over the far half
    change = (states[-1, :, :2] - states[0, :, :2]).abs().cpu().numpy()  # [N, joints], the path's own (wrapped)
    out["joint_change"] = change.tolist()
    far = ~near_half(distance[0])
    rise = np.asarray(out["rise"])
    out["rise_vs_joint_change"] = {
        joint: {"all": float(spearman(rise[:, None], change[:, j : j + 1])[0]),
                "far": float(spearman(rise[far][:, None], change[far, j : j + 1])[0])}
        for j, joint in enumerate(("shoulder", "wrist"))}
    print(f"[risk_along_paths] rho(climb, |joint change|): {json.dumps(out['rise_vs_joint_change'])}", flush=True)
    out["seconds"] = time.time() - started
    for half in ("near", "far"):
        print(f"[risk_along_paths] {half}: {json.dumps(out[half])}", flush=True)
        for reading in ("latent_distance", "observation_risk", "pixel_distance"):
            print(f"[risk_along_paths] {half}, {reading}: {json.dumps(out[reading][half])}", flush=True)
    fig_dir = Path(args.fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    (fig_dir / "risk_along_paths.json").write_text(json.dumps(out, indent=1))
    plot_paths(out, fig_dir / "risk_along_paths.png")
    return out


READINGS = {"risk": "latent risk KL(q(s|o) || q(s|o_goal))", "latent_distance": "||mu - mu_goal||^2",
            "observation_risk": "observation risk (decoded belief)",
            "pixel_distance": "pixel distance to the goal frame", "distance": "fingertip distance"}


def relative_curves(out: dict, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Each reading along the paths in ``rows`` (bool ``[N]``) relative to its value at the start pose:
    ``[P, 3]`` per reading, the 25th, 50th and 75th percentiles over the paths at each pose."""
    curves = {}
    for name in READINGS:
        values = np.asarray(out[name] if name in ("risk", "distance") else out[name]["values"])[rows]  # [n, P]
        relative = values / np.maximum(np.abs(values[:, :1]), 1e-12)
        curves[name] = np.percentile(relative, [25, 50, 75], axis=0).T
    return curves


def plot_paths(out: dict, path: Path) -> None:
    """Two panels, near and far half (split at the median start distance), on the paths whose fingertip distance
    falls at every step: the median of each reading relative to its start value against the fraction of the path,
    its interquartile band shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = np.asarray(out["start_distance"])
    fair = np.asarray(out["distance_monotone"])
    near = near_half(start)
    alphas = np.linspace(0.0, 1.0, out["points"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (half, rows) in zip(axes, (("near", near & fair), ("far", ~near & fair)), strict=True):
        for name, curve in relative_curves(out, rows).items():
            style = {"color": "black", "linestyle": "--"} if name == "distance" else {}
            line, = ax.plot(alphas, curve[:, 1], label=READINGS[name], **style)
            ax.fill_between(alphas, curve[:, 0], curve[:, 2], color=line.get_color(), alpha=0.12)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_title(f"{half} half: {int(rows.sum())} paths (fingertip nearing at every step)")
        ax.set_xlabel("fraction of the straight joint path, start -> goal")
    axes[0].set_ylabel("reading / its value at the start (median, IQR)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
