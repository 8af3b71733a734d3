"""Which latent actions make the best pseudo-labels? Co-training (``bench_stamo.py eval``, check 8) labels the
action-less video parts with ``probe_k(E(o_{t+k}) - E(o_t))[0]``: the probe of the BC's offset k, fitted on the
labelled part, decoded to the k-step chunk, its first action kept. Its labels' MSE against the video parts' true
actions sets how far the pseudo-labelled policy gets. This study fits other labellers on the same labelled rows
and scores them the same way; each reads token differences of the video alone (no action, no state):

- ``chunk_k``: the bench's labeller (the chunk probe at the BC's k, first action);
- ``step``: ``E(o_{t+1}) - E(o_t) -> a_t`` (the one-step latent action);
- ``prev+step``: ``[E(o_t) - E(o_{t-1}), E(o_{t+1}) - E(o_t)] -> a_t`` (the step before shows the velocity the
  action changed; zero at t = 0);
- ``prev+step+next``: the step after as well;
- ``prev+step+chunk_k``: the step before, the step, and the BC's k-step latent action;
- ``state+chunk_k``: the chunk probe reading E(o_t) beside the k-step latent action (first action kept);
- ``windows``: ``bench_stamo.pseudo_labels``'s ``windows`` labeller (co-training's ``--pseudo-labeller
  windows``): ``state+chunk_k``'s probe, each step's label the mean of its k windows' predictions for it;
- ``chunk_k ridge``: ``chunk_k`` with a linear probe (``bench_stamo.ridge``, lambda 1e-3) in place of the MLP;
- ``pca_cv``: co-training's ``--pseudo-labeller pca_cv`` (``windows`` on the tokens' top principal components,
  averaged over several offsets, both chosen by cross-validation on the labelled episodes).

    python docs/bench_stamo/labeller_variants.py --out-dir /work/stamo_r250

Prints each labeller's MSE and the mean size of its labels beside the true actions', and writes ``--json``
(default ``labeller_variants.json`` beside this file)."""

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


def latent_steps(flat: torch.Tensor, e: torch.Tensor, t: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What each labeller reads at rows (e, t) of pairs k apart: the token differences of the step before (zero at
    t = 0), the step, the step after (k >= 2 only: t + 2 must lie in the pair) and the k-step one, and the tokens
    E(o_t) themselves ("state")."""
    before = torch.where((t > 0)[:, None], flat[e, t] - flat[e, (t - 1).clamp_min(0)], torch.zeros_like(flat[e, t]))
    out = {"prev": before, "step": flat[e, t + 1] - flat[e, t], "chunk": flat[e, t + k] - flat[e, t],
           "state": flat[e, t]}
    if k >= 2:
        out["next"] = flat[e, t + 2] - flat[e, t + 1]
    return out


LABELLERS = {"chunk_k": ("chunk",), "step": ("step",), "prev+step": ("prev", "step"),
             "prev+step+next": ("prev", "step", "next"), "prev+step+chunk_k": ("prev", "step", "chunk"),
             "state+chunk_k": ("state", "chunk"), "windows": (), "chunk_k ridge": ("chunk",), "pca_cv": ()}
BENCH_LABELLERS = {"chunk_k": "chunk", "windows": "windows", "pca_cv": "pca_cv"}
"""The rows that are co-training's labellers, run by the bench's own ``pseudo_labels``."""
CHUNK_TARGETS = ("state+chunk_k", "chunk_k ridge")
"""The study's other labellers fitted to the action chunk a_{t:t+k} (their first action is the label); the rest to
a_t."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--probe-updates", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(HERE / "labeller_variants.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ns, data, train_eps, test_eps, agent = bs.open_run(args.out_dir, probe_updates=args.probe_updates)
    t0 = time.time()
    flat = bs.encode_all(agent.world_model, data["pixels"]).flatten(2)
    bs.log(f"encoded {tuple(flat.shape)} in {time.time() - t0:.0f} s")
    act, k = data["action"], agent.config.cotrain_offset
    n_steps = data["pixels"].shape[1] - 1
    labelled, video = bs.labelled_part(train_eps)
    (e_lab, t_lab), (e_vid, t_vid) = bs.offset_pairs(n_steps, k, labelled), bs.offset_pairs(n_steps, k, video)
    feats_lab, feats_vid = latent_steps(flat, e_lab, t_lab, k), latent_steps(flat, e_vid, t_vid, k)
    truth = act[e_vid, t_vid]
    out = {"out_dir": args.out_dir, "updates_autoencoder": agent.trained_updates, "k": k,
           "labelled_episodes": len(labelled), "video_rows": len(e_vid),
           "mean_action_mse": float((act[e_lab, t_lab].mean(0) - truth).square().mean()), "labellers": {},
           "action_mean_abs": float(truth.abs().mean()), "label_mean_abs": {}}
    for name, parts in LABELLERS.items():
        if not set(parts) <= set(feats_lab):
            bs.log(f"{name}: skipped (k = {k} has no step after t + 1 inside the pair)")
            continue
        if name in BENCH_LABELLERS:  # co-training's labellers, as the bench runs them
            report = {}
            label = bs.pseudo_labels(flat, act, (e_lab, t_lab), (e_vid, t_vid), k, BENCH_LABELLERS[name],
                                     args.probe_updates, report=report)
            if report:
                out.setdefault("choice", {})[name] = report["chosen"]
        else:
            x_lab = torch.cat([feats_lab[p_] for p_ in parts], 1)
            x_vid = torch.cat([feats_vid[p_] for p_ in parts], 1)
            if name in CHUNK_TARGETS:  # the k-step chunk, its first action kept
                y = bs.action_chunks(act, e_lab, t_lab, k).flatten(1)
            else:
                y = act[e_lab, t_lab]
            probe = bs.ridge(x_lab, y) if name.endswith("ridge") else bs.fit_mlp(x_lab, y, args.probe_updates,
                                                                                 seed=11)
            label = probe(x_vid)[:, :act.shape[-1]].clamp(-1, 1)
        out["labellers"][name] = mse = float((label - truth).square().mean())
        # how large the labels are beside the true actions (a probe fitted by MSE shrinks toward the mean)
        out["label_mean_abs"][name] = size = float(label.abs().mean())
        bs.log(f"{name:>18}: pseudo-label MSE on the video parts {mse:.4f}, mean |label| {size:.3f}")
    bs.log(f"mean action {out['mean_action_mse']:.4f}; true actions' mean |a| {out['action_mean_abs']:.3f}")
    Path(args.json).write_text(json.dumps(out, indent=2))
    bs.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
