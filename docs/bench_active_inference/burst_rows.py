"""Which rows of a batch drive a gradient burst of the active inference world model (issue 14)?

A diagnostic for the files ``bench_active_inference.py --burst-dump PREFIX`` writes (``PREFIX.<update>.pt``: the
parameters before the update that burst, torch's RNG state at it, and its batch). Run as

    python docs/bench_active_inference/burst_rows.py PREFIX.<update>.pt [--set KEY=VALUE ...] [--json OUT]

with the ``--preset`` / ``--set`` of the run that wrote it. It re-computes that update's free energy from the same
parameters, draws and batch and reports, per slice and step of the batch, the transition KL, the reconstruction
NLL and the smallest std of the posterior and of the transition prior; the rows with the largest KL; and each
term's gradient norm on each part of the model (``gradient_norms_by_term``, the bench prints it too). Then it asks
what the update's gradient would have been without the few largest-KL rows (are they the burst?) and with every
std floored at larger values (would a larger ``min_std`` have prevented it?).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from tensordict import TensorDict

from latentrl.training.checkpoint import load_plain

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_active_inference",
                                                  ROOT / "scripts" / "bench_active_inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_active_inference"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dump")
    p.add_argument("--preset", default="small")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=8, help="rows listed, largest transition KL first")
    p.add_argument("--floors", default="0.03,0.1", help="std floors tried on the same update")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bench = load_bench()
    bench_args = bench.parse_args(["--preset", args.preset, *sum((["--set", o] for o in args.overrides), [])])
    dump = load_plain(args.dump)  # tensors, numbers and strings: opening it runs no code
    batch = TensorDict(dump["batch"], batch_size=dump["batch_size"])
    agent = bench.build_agent(bench_args)
    agent.load_state_dict(dump["agent_before"])
    wm = agent.world_model
    # dumps of 2026-12-04 kept torch's states as "rng_state" / "cuda_rng_state"; later ones capture_rng()'s "rng"
    torch_state = dump["rng"]["torch"] if "rng" in dump else dump["rng_state"]
    on_gpu = dump.get("device", "cpu").startswith("cuda") or dump.get("cuda_rng_state") is not None
    if on_gpu:  # its draws came from the GPU's generator, not replayable here
        print("burst_rows: this dump is from a run on a GPU; the CPU replays it with other draws of the latent "
              "samples (same parameters and batch), so its norms differ from the update's", file=sys.stderr)

    def replay(fn):
        torch.set_rng_state(torch_state)
        return fn()

    rows = replay(lambda: wm.loss_terms(batch))["rows"]
    kl = rows["kl_transition"]
    order = kl.flatten().argsort(descending=True)
    b, length = kl.shape
    top = [{"slice": int(i) // length, "step": int(i) % length, "kl_transition": float(kl.flatten()[i]),
            "recon_next": float(rows["recon"][int(i) // length, int(i) % length + 1]),
            "posterior_std_min": float(rows["posterior_std_min"][int(i) // length, int(i) % length + 1]),
            "prior_std_min": float(rows["prior_std_min"].flatten()[i])} for i in order[: args.top]]
    out = {"dump": args.dump, "update": dump["burst"]["update"], "grad_norm": dump["burst"]["grad_norm"],
           "same_draws": not on_gpu,
           "rows": b * length,
           "kl_transition": {"mean": float(kl.mean()), "median": float(kl.median()), "max": float(kl.max()),
                             "top_share": float(kl.flatten()[order[: args.top]].sum() / kl.sum())},
           "prior_std_min": float(rows["prior_std_min"].min()),
           "posterior_std_min": float(rows["posterior_std_min"].min()),
           "recon": {"median": float(rows["recon"].median()), "max": float(rows["recon"].max())},
           "top_rows": top,
           "by_term": replay(lambda: agent.gradient_norms_by_term(batch))}
    # the same update without the largest-KL slices (masked out of the transition KL: has_action False)
    without = batch.clone()
    dropped = sorted({row["slice"] for row in top})
    without["has_action"][dropped] = False
    out["without_top_slices"] = {"slices": dropped,
                                 "by_term": replay(lambda: agent.gradient_norms_by_term(without))["total"]}
    # the same parameters with every std floored higher (the heads' min_std; the rest unchanged)
    floors = {}
    for floor in (float(f) for f in args.floors.split(",") if f):
        heads = [wm.posterior_head, *(member[-1] for member in wm.transitions)]
        saved = [h.min_std for h in heads]
        for h in heads:
            h.min_std = max(h.min_std, floor)
        try:
            floors[str(floor)] = replay(lambda: agent.gradient_norms_by_term(batch))["total"]
        finally:
            for h, m in zip(heads, saved, strict=True):
                h.min_std = m
    out["std_floors"] = floors
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
