"""Checks 2 and 3 of a saved model with the planner's random draws made per candidate, as before common random
numbers (2026-12-02): the ablation behind `results_independent_draws.json` in docs/bench_active_inference.md.

    python docs/bench_active_inference/independent_draws.py --load-model <model.pt> --data <buffers> [bench options]

Takes the options of scripts/bench_active_inference.py (the same model settings, data and seeds as the page's run)
and prints / writes the ranking and goal-reaching results with independent draws for every candidate: each of
the K candidates gets its own J belief samples, ensemble members and transition noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402

from latentrl.agents.active_inference import ActiveInferenceAgent, ActiveInferencePolicy  # noqa: E402


def independent_noise(agent: ActiveInferenceAgent):
    """``common_noise`` replaced: fresh draws ``[N * K * J, H, ...]`` for every candidate."""
    members = len(agent.world_model.transitions)

    def noise(draws: dict, k: int) -> dict:
        n, j, h, d = draws["eps"].shape
        return {"eps": torch.randn(n * k * j, h, d), "member": torch.randint(members, (n * k * j, h))}

    return staticmethod(noise)


def main() -> None:
    args = bench.parse_args(sys.argv[1:])
    torch.set_num_threads(args.threads)
    _, heldout = bench.load_or_collect(args)
    agent = bench.load_saved_agent(args)
    ActiveInferencePolicy.common_noise = independent_noise(agent)
    torch.manual_seed(args.seed)
    out = {"check2": bench.scorer_ranking(agent, heldout, args),
           "check2_h5": bench.scorer_ranking(agent, heldout, args, horizon=5)}
    print({k: (v["G_nonconstant_fraction_in_best_20pct"], v["G_nonconstant_median_rank"]) for k, v in out.items()})
    result = bench.goal_reaching(agent, heldout, args)
    out["check3"] = {k: result[k] for k in ("agent", "risk_only", "random", "zero")}
    path = Path(args.fig_dir) / "results_independent_draws.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
