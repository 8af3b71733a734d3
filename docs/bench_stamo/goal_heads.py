"""Which goal head reaches reacher goals from goal images? The goal-reaching check of ``bench_stamo.py eval``
for variants of the goal head on one trained autoencoder, each on the same 50 goals and start poses:

- ``mlp, all episodes``: the default head (MLP 2 x 256) trained on hindsight pairs of every training episode (what
  ``bench_stamo.py eval`` runs);
- ``linear, all episodes``: Table 6's linear head (``goal_head_hidden=0``);
- ``mlp, labelled part``: the default head trained on the action-labelled fifth only (what ``train_agent.py
  agent=stamo`` trains it on, with the other four fifths stored as video).

The probe policy, random and zero actions and the co-trained BC policy are not rerun here (they do not change
with the head; see the page's table).

    python docs/bench_stamo/goal_heads.py --out-dir /tmp/stamo      # the dir of `bench_stamo.py data` + `train`

Writes ``goal_heads.json`` beside this file (``--json``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_stamo as bs  # noqa: E402

from latentrl.agents.stamo import GoalHead  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--goals", type=int, default=50)
    p.add_argument("--goal-steps", type=int, default=50)
    p.add_argument("--updates", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(HERE / "goal_heads.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    ns, data, train_eps, test_eps, agent = bs.open_run(args.out_dir, goals=args.goals, goal_steps=args.goal_steps,
                                                        seed=args.seed)
    labelled_eps, _ = bs.labelled_part(train_eps)  # as bench_stamo's co-training check
    flat = bs.encode_all(agent.world_model, data["pixels"]).flatten(2)
    pool = data["physics"][test_eps].flatten(0, 1)
    variants = {"mlp, all episodes": (256, train_eps), "linear, all episodes": (0, train_eps),
                "mlp, labelled part": (256, labelled_eps)}
    results = {"updates_autoencoder": agent.trained_updates, "goals": args.goals, "steps": args.goal_steps,
               "variants": {}}
    baseline = None
    for name, (hidden, eps) in variants.items():
        t0 = time.time()
        torch.manual_seed(args.seed)
        agent.config.goal_head_hidden = hidden
        agent.goal_head = GoalHead(agent.latent_dim, agent.action_dim, hidden)
        fit = bs.fit_goal_heads(agent, flat, data["action"], eps, test_eps, args.updates, seed=args.seed + 21)
        gr = bs.goal_reaching(ns, agent, pool)
        head = gr[gr["judged"]]
        row = {"hidden": hidden, "train_episodes": len(eps), "heldout_mse": fit["goal_head"]["heldout_mse"],
               "mean_action_mse": fit["goal_head"]["mean_action_mse"], "final_distance": head["final_distance"],
               "start_distance": head["start_distance"], "final_distances": head["final_distances"],
               "paired": gr["paired"], "seconds": time.time() - t0}
        if baseline is None:  # the baselines' distances (the same starts and goals every time)
            baseline = {n: gr[n]["final_distance"] for n in gr if isinstance(gr[n], dict) and "final_distance" in gr[n]}
            results["baselines"] = baseline
        results["variants"][name] = row
        pr, pz = gr["paired"]["random"], gr["paired"]["zero action"]
        print(f"{name}: final {head['final_distance']:.3f} (start {head['start_distance']:.3f}); minus random "
              f"{pr['mean_difference']:+.3f} (SE {pr['se']:.3f}); minus zero {pz['mean_difference']:+.3f} "
              f"(SE {pz['se']:.3f}); held-out action MSE {row['heldout_mse']:.4f} (mean action "
              f"{row['mean_action_mse']:.4f}); {row['seconds']:.0f} s", flush=True)
    assert math.isfinite(results["variants"]["mlp, all episodes"]["final_distance"])
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
