"""How much of checks 6 and 7's failure on reacher was the sampler's? Until 2026-12-05 ``bench_stamo.py eval``
decoded every frame of an interpolation row, and the frame before and after a motion transfer, from its own noise
draw, so a decoded 'change' held two draws' difference beside the tokens'. This script scores both checks on the
same cases of one trained autoencoder twice: with independent draws (as before) and with one noise per case (as
``interpolation_frames`` / ``transfer_frames`` do now), read out by both of eval's state probes.

    python docs/bench_stamo/noise_pairing.py --out-dir /tmp/stamo --cases 128

``--out-dir`` holds ``bench_stamo.py data`` + ``train`` (``episodes.pt``, ``stamo_wm.pt``). Writes ``--json``
(default ``noise_pairing.json`` beside this file)."""

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--cases", type=int, default=128, help="interpolation pairs, and transfer cases")
    p.add_argument("--probe-updates", type=int, default=1500)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(HERE / "noise_pairing.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    run = bs.open_run_with_readouts(args.out_dir, args.sample_steps, args.probe_updates, args.seed)
    ns, test_eps, agent, wm, spec = run.args, run.test_eps, run.agent, run.wm, run.spec
    q, tokens, readouts, r2 = run.q, run.tokens, run.readouts, run.r2
    n_frames = run.data["pixels"].shape[1]

    g = torch.Generator().manual_seed(args.seed + 1000)
    n, k = args.cases, 4
    alphas = torch.linspace(0, 1, 5)
    e_i = test_eps[torch.randint(len(test_eps), (n,), generator=g)]
    t_i = torch.randint(n_frames - k, (n,), generator=g)
    z1, z2 = tokens[e_i, t_i], tokens[e_i, t_i + k]
    true_move = spec.difference(q[e_i, t_i + k], q[e_i, t_i])
    e_src = test_eps[torch.randint(len(test_eps), (n,), generator=g)]
    e_dst = test_eps[torch.randint(len(test_eps), (n,), generator=g)]
    t_src = torch.randint(n_frames - k, (n,), generator=g)
    t_dst = torch.randint(n_frames, (n,), generator=g)
    delta = tokens[e_src, t_src + k] - tokens[e_src, t_src]
    base_tokens = tokens[e_dst, t_dst]
    src_change = spec.difference(q[e_src, t_src + k], q[e_src, t_src])

    interp = torch.cat([(1 - a) * z1 + a * z2 for a in alphas])
    frames = {"independent draws": (bs.decode(wm, interp, args.sample_steps, seed=1),
                                    bs.decode(wm, torch.cat([base_tokens, base_tokens + delta]), args.sample_steps,
                                              seed=2)),
              "one noise per case": (bs.interpolation_frames(wm, z1, z2, alphas, args.sample_steps),
                                     torch.cat(bs.transfer_frames(wm, base_tokens, delta, args.sample_steps)))}
    out = {"out_dir": args.out_dir, "task": ns.task, "updates": agent.trained_updates, "cases": n, "k": k,
           "readout_r2": r2, "schemes": {}}
    for scheme, (decoded, both) in frames.items():
        along = bs.read_joints(wm, decoded, readouts, spec)
        before, after = bs.read_joints(wm, both[:n], readouts, spec), bs.read_joints(wm, both[n:], readouts, spec)
        res = {}
        for name in readouts:
            score = bs.interpolation_scores(along[name].reshape(len(alphas), n, -1), alphas, true_move, spec)
            res[name] = {"interpolation_cases": score["cases"],
                         "interpolation_share_rho_above_0.9": score["share_rho_above_0.9"],
                         "interpolation_spearman_mean": score["spearman_mean"],
                         "transfer": bs.transfer_cosines(spec.difference(after[name], before[name]), src_change)}
            bs.log(f"{scheme}, {name} readout: interpolation rho > 0.9 in "
                   f"{score['share_rho_above_0.9']:.2f} of {score['cases']}; transfer positive in "
                   f"{res[name]['transfer']['share_positive_cosine']:.2f} of {n}")
        out["schemes"][scheme] = res
    out["seconds"] = time.time() - t0
    Path(args.json).write_text(json.dumps(out, indent=2))
    bs.log(f"wrote {args.json} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
