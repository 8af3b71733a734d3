"""Why does motion transfer (check 7) stay near chance on reacher? The page's guess: a token difference taken at one
arm configuration does not move another configuration's arm alike. This script tests that guess on one trained
autoencoder: the same held-out source moves ``dz = E(o_{t+k}) - E(o_t)`` are added (a) to the source's own start
tokens ``E(o_t)`` (no transfer: the decoder and readout alone) and (b) to the tokens of a frame of another held-out
episode (eval's check 7), and the cases of (b) are split by how far the target's joints lie from the source's start
(wrapped joint-angle distance, in quartiles). Each case is decoded before and after from one sampler noise
(``bench_stamo.transfer_frames``) and read by eval's MLP readout; the score is check 7's share of positive cosines
between the decoded and the source's joint change.

    python docs/bench_stamo/transfer_by_distance.py --out-dir /tmp/stamo --cases 256

``--out-dir`` holds ``bench_stamo.py data`` + ``train``. Writes ``--json`` and a figure beside it (``.png``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_stamo as bs  # noqa: E402


def decoded_change(wm, base: torch.Tensor, delta: torch.Tensor, readouts: dict, spec, steps: int) -> dict:
    """The readouts' joint change between D(base) and D(base + delta), one noise per case."""
    before, after = bs.transfer_frames(wm, base, delta, steps)
    b, a = bs.read_joints(wm, before, readouts, spec), bs.read_joints(wm, after, readouts, spec)
    return {name: spec.difference(a[name], b[name]) for name in readouts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--cases", type=int, default=256)
    p.add_argument("--k", type=int, default=4, help="eval's check-7 offset")
    p.add_argument("--probe-updates", type=int, default=1500)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(HERE / "transfer_by_distance.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    run = bs.open_run_with_readouts(args.out_dir, args.sample_steps, args.probe_updates, args.seed)
    ns, test_eps, agent, wm, spec = run.args, run.test_eps, run.agent, run.wm, run.spec
    q, tokens, readouts = run.q, run.tokens, run.readouts
    n_frames, n, k = run.data["pixels"].shape[1], args.cases, args.k

    g = torch.Generator().manual_seed(args.seed + 2000)
    e_src = test_eps[torch.randint(len(test_eps), (n,), generator=g)]
    t_src = torch.randint(n_frames - k, (n,), generator=g)
    e_dst = test_eps[torch.randint(len(test_eps), (n,), generator=g)]
    t_dst = torch.randint(n_frames, (n,), generator=g)
    delta = tokens[e_src, t_src + k] - tokens[e_src, t_src]
    src_change = spec.difference(q[e_src, t_src + k], q[e_src, t_src])
    distance = spec.difference(q[e_dst, t_dst], q[e_src, t_src]).norm(dim=-1)

    same = decoded_change(wm, tokens[e_src, t_src], delta, readouts, spec, args.sample_steps)
    other = decoded_change(wm, tokens[e_dst, t_dst], delta, readouts, spec, args.sample_steps)
    edges = torch.quantile(distance, torch.tensor([0.25, 0.5, 0.75]))
    bins = torch.bucketize(distance, edges)
    out = {"out_dir": args.out_dir, "task": ns.task, "updates": agent.trained_updates, "cases": n, "k": k,
           "readout_r2": run.r2,
           "distance_quartile_edges_rad": edges.tolist(), "by_readout": {}}
    for name in readouts:
        res = {"own start (no transfer)": bs.transfer_cosines(same[name], src_change),
               "other frame (check 7)": bs.transfer_cosines(other[name], src_change)}
        cos = torch.nn.functional.cosine_similarity(other[name], src_change, dim=-1)
        res["other frame by distance quartile"] = [
            {"distance_rad": [float(distance[bins == b].min()), float(distance[bins == b].max())],
             "cases": int((bins == b).sum()), "share_positive_cosine": float((cos[bins == b] > 0).float().mean()),
             "mean_cosine": float(cos[bins == b].mean())} for b in range(4) if (bins == b).any()]
        out["by_readout"][name] = res
        bs.log(f"{name}: own start {res['own start (no transfer)']['share_positive_cosine']:.2f}, other frame "
               f"{res['other frame (check 7)']['share_positive_cosine']:.2f}, by distance quartile "
               f"{[round(r['share_positive_cosine'], 2) for r in res['other frame by distance quartile']]}")
    out["seconds"] = time.time() - t0
    Path(args.json).write_text(json.dumps(out, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, res in out["by_readout"].items():
        quart = res["other frame by distance quartile"]
        mids = [sum(r["distance_rad"]) / 2 for r in quart]
        line, = ax.plot(mids, [r["share_positive_cosine"] for r in quart], "o-", label=f"{name}: other frame")
        ax.axhline(res["own start (no transfer)"]["share_positive_cosine"], ls="--", color=line.get_color(),
                   label=f"{name}: own start")
    ax.axhline(0.7, color="k", lw=0.8, label="check 7's 70%")
    ax.set_xlabel("target's distance to the source's start (rad; quartiles)")
    ax.set_ylabel("share of positive cosines")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(args.json).with_suffix(".png"), dpi=90)
    bs.log(f"wrote {args.json} and its .png ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
