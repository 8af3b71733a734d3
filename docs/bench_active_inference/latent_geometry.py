"""Does the risk toward a goal image grow with the distance to the goal? (check 3's stall, 2026-12-02)

    python docs/bench_active_inference/latent_geometry.py --load-model <model.pt> --data <buffers> [bench options]

Takes the options of scripts/bench_active_inference.py (the model settings and the buffers of the page's run). From
600 held-out frames it forms every (state, goal) pair: the state's belief q(s|o) from its real frame stack, the goal's
from its newest frame tiled (a still goal, as ``infer_task`` builds it for check 3), and the point mass's distance
between the two frames. It reports how the one-step risk ``KL(q(s|o) || q(s|o_goal))`` grows with that distance:
medians per distance bin, the Spearman correlation per goal, and how often a state 1-3 cm nearer the goal (among the
held-out frames) has the lower risk.

Then it asks whether the imagined rollouts lead there: for 60 (state, goal) pairs at least 10 cm apart it scores,
with the policy's own scorer (``ActiveInferencePolicy.score``, H = the planning horizon), constant actions of 16
directions and 5 magnitudes, and reports which magnitude has the lowest risk and the cosine between that action
and the direction to the goal (point_mass: action 0 pushes along x, action 1 along y; a model that has learned the
goal's direction gives cosines near 1, one that has not gives cosines spread around 0).
Writes ``latent_geometry.json`` and ``latent_geometry.png`` to ``--fig-dir``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402

from latentrl.agents import GoalObservation  # noqa: E402
from latentrl.agents.active_inference import ActiveInferenceAgent  # noqa: E402
from latentrl.envs import get_task  # noqa: E402
from latentrl.world_models.layers import gaussian_kl  # noqa: E402

FRAMES = 600
PAIRS = 60
MAGNITUDES = (0.0, 0.25, 0.5, 0.75, 1.0)
DIRECTIONS = 16
BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (ranks by argsort; ties are broken by order, which continuous values do not have)."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@torch.no_grad()
def geometry(agent: ActiveInferenceAgent, heldout, task, seed: int) -> dict:
    torch.manual_seed(seed)
    batch = heldout.sample(FRAMES, frame_stack=agent.frame_stack, keys=["pixels", "physics"])
    pos = task.body_position(batch["physics"].cpu().numpy())
    mean, std = agent.world_model.posterior(batch["pixels"])
    goal = agent.infer_task(GoalObservation(obs=batch.select("pixels").apply(lambda x: x[:, -3:])))
    goal_mean, goal_std = goal.z.chunk(2, dim=-1)
    risk = gaussian_kl(mean[:, None], std[:, None], goal_mean[None], goal_std[None]).numpy()  # [state, goal]
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    off = ~np.eye(FRAMES, dtype=bool)
    bins = []
    for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
        sel = off & (dist >= lo) & (dist < hi)
        if sel.any():
            q = np.quantile(risk[sel], [0.25, 0.5, 0.75])
            bins.append({"from": lo, "to": hi, "pairs": int(sel.sum()), "q25": float(q[0]), "median": float(q[1]),
                         "q75": float(q[2])})
    rho = np.array([spearman(dist[off[:, j], j], risk[off[:, j], j]) for j in range(FRAMES)])
    # a step toward the goal: state i (>= 5 cm from goal j) against the held-out states k 1-3 cm from i that are
    # at least 1 cm nearer the goal; the share of such (i, k) pairs whose risk is lower at k
    lower = total = 0
    step = (dist > 0.01) & (dist < 0.03)
    for j in range(FRAMES):
        for i in np.where(dist[:, j] >= 0.05)[0]:
            nearer = np.where(step[i] & (dist[:, j] <= dist[i, j] - 0.01))[0]
            lower += int((risk[nearer, j] < risk[i, j]).sum())
            total += len(nearer)
    return {"frames": FRAMES, "bins": bins, "spearman_per_goal_median": float(np.median(rho)),
            "spearman_per_goal_q10": float(np.quantile(rho, 0.1)), "nearer_state_lower_risk": lower / max(total, 1),
            "nearer_pairs": total}


@torch.no_grad()
def action_direction(agent: ActiveInferenceAgent, heldout, task, seed: int) -> dict:
    """The lowest-risk constant action toward a goal frame, scored by the policy's imagined rollouts."""
    torch.manual_seed(seed + 1)
    batch = heldout.sample(FRAMES, frame_stack=agent.frame_stack, keys=["pixels", "physics"])
    pos = task.body_position(batch["physics"].cpu().numpy())
    rng = np.random.default_rng(seed)
    draws = zip(rng.integers(0, FRAMES, 50 * PAIRS), rng.integers(0, FRAMES, 50 * PAIRS), strict=True)
    pairs = [(i, j) for i, j in draws if np.linalg.norm(pos[i] - pos[j]) > 0.1][:PAIRS]
    angles = np.linspace(0.0, 2 * np.pi, DIRECTIONS, endpoint=False)
    actions = torch.tensor([[m * np.cos(a), m * np.sin(a)] for m in MAGNITUDES for a in angles], dtype=torch.float32)
    horizon = agent.config.plan_horizon
    candidates = actions[None, :, None, :].expand(1, -1, horizon, -1)
    wm = agent.world_model
    best_magnitude, cosine, gain = [], [], []
    for i, j in pairs:
        goal = agent.infer_task(GoalObservation(obs=batch[j:j + 1].select("pixels").apply(lambda x: x[:, -3:])))
        goal_mean, goal_std = goal.z.chunk(2, dim=-1)
        state = wm.observe(wm.initial_state(1), batch[i:i + 1].select("pixels"), None, torch.ones(1, dtype=torch.bool))
        torch.manual_seed(seed + 2)
        risk = agent.policy(goal).score(state, candidates, goal_mean, goal_std)["risk"][0].numpy()
        best = int(np.argmin(risk))
        best_magnitude.append(MAGNITUDES[best // DIRECTIONS])
        to_goal, action = pos[j] - pos[i], actions[best].numpy()
        cosine.append(float(action @ to_goal / (np.linalg.norm(action) * np.linalg.norm(to_goal) + 1e-12)))
        gain.append([float(risk[m * DIRECTIONS:(m + 1) * DIRECTIONS].min() - risk[0]) for m in range(len(MAGNITUDES))])
    cosine = np.array(cosine)
    return {"pairs": len(pairs), "horizon": horizon,
            "best_magnitude_counts": {str(m): best_magnitude.count(m) for m in MAGNITUDES},
            "cosine_to_goal_median": float(np.median(cosine)), "cosine_to_goal_positive": float(np.mean(cosine > 0)),
            "best_risk_minus_zero_action_by_magnitude": np.median(np.array(gain), axis=0).tolist()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = result["bins"]
    mid = [(b["from"] + b["to"]) / 2 for b in bins]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(mid, [b["median"] for b in bins], "o-", label="median")
    ax.fill_between(mid, [b["q25"] for b in bins], [b["q75"] for b in bins], alpha=0.3, label="25-75%")
    ax.set_xlabel("point-mass distance between state and goal frame (m)")
    ax.set_ylabel("one-step risk KL(q(s|o) || q(s|o_goal)) (nats)")
    ax.set_title(f"nearer by >= 1 cm -> lower risk: {result['nearer_state_lower_risk']:.0%}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = bench.parse_args(sys.argv[1:])
    torch.set_num_threads(args.threads)
    _, heldout = bench.load_or_collect(args)
    agent = bench.load_saved_agent(args)
    task = get_task(args.task)
    result = geometry(agent, heldout, task, args.seed)
    result["action_direction"] = action_direction(agent, heldout, task, args.seed)
    fig_dir = Path(args.fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    (fig_dir / "latent_geometry.json").write_text(json.dumps(result, indent=1))
    plot(result, fig_dir / "latent_geometry.png")
    for b in result["bins"]:
        print(f"distance {b['from']:.2f}-{b['to']:.2f} m: median risk {b['median']:.0f} "
              f"(25-75%: {b['q25']:.0f}-{b['q75']:.0f}), {b['pairs']} pairs")
    print(f"Spearman(distance, risk) per goal: median {result['spearman_per_goal_median']:.2f}, "
          f"10% {result['spearman_per_goal_q10']:.2f}; a state >= 1 cm nearer has the lower risk in "
          f"{result['nearer_state_lower_risk']:.1%} of {result['nearer_pairs']} pairs")
    d = result["action_direction"]
    print(f"lowest-risk constant action over H = {d['horizon']} ({d['pairs']} pairs >= 10 cm apart): magnitudes "
          f"{d['best_magnitude_counts']}; cosine to the goal direction median {d['cosine_to_goal_median']:.2f}, "
          f"positive in {d['cosine_to_goal_positive']:.0%}; best risk minus the zero action's by magnitude "
          f"{[round(v, 1) for v in d['best_risk_minus_zero_action_by_magnitude']]}")


if __name__ == "__main__":
    main()
