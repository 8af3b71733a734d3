"""Why does the co-training check's 5-part BC of seed 0 stay at the mean action, and which change of the BC net
stops it? Trains that BC net (``bench_stamo.train_goal_bc``: pairs k = 4 steps apart from every training episode,
true actions) as ``bench_stamo.cotraining`` does, for each variant and learning rate, and prints along the way its
batch loss, the spread of its outputs over 256 held-out pairs, and the share of trunk features and head units that
are inactive for every one of those pairs (dead ReLUs). Reads only the episodes of ``--out-dir`` (no autoencoder:
this condition never uses one).

    python docs/bench_stamo/bc_collapse.py --out-dir /tmp/stamo --variants frames difference --lrs 1e-3 3e-4

Variants: ``frames`` (the net that collapsed: goal frame beside o_t; ``ae250_20k/bc_collapse_seed0.log``, written
before the variants existed, is this one), ``difference`` (o_{t+k} - o_t beside o_t: the presets'
``bc_goal_input`` since 2026-12-05), and on the frames net: ``gn_trunk`` (GroupNorm(1, C) after each conv),
``instance_norm`` (GroupNorm(C, C)), ``ln_head`` (LayerNorm in the head), ``gn_trunk_ln_head`` (both) and
``warmup`` (the rate ramped up over 200 updates).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "scripts"))

import bench_stamo as bs  # noqa: E402

VARIANTS = ("frames", "difference", "gn_trunk", "instance_norm", "ln_head", "gn_trunk_ln_head", "warmup")


def make_net(variant: str, obs_shape, action_dim: int, channels: int = 32) -> nn.Module:
    """A ``GoalBCNet`` of ``variant`` (built after ``train_goal_bc`` seeds the generator, so every variant starts
    from the weights that generator gives it)."""
    from latentrl.agents.stamo import GoalBCNet

    net = GoalBCNet("pixels", obs_shape, action_dim, channels, "difference" if variant == "difference" else "frames")
    if variant in ("gn_trunk", "instance_norm", "gn_trunk_ln_head"):
        norm = (lambda ch: nn.GroupNorm(ch, ch)) if variant == "instance_norm" else (lambda ch: nn.GroupNorm(1, ch))
        c = obs_shape[0]
        net.trunk = nn.Sequential(
            nn.Conv2d(2 * c, channels, 4, 2, 1), norm(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), norm(2 * channels), nn.ReLU(),
            nn.Conv2d(2 * channels, 2 * channels, 4, 2, 1), norm(2 * channels), nn.ReLU(), nn.Flatten())
    if variant in ("ln_head", "gn_trunk_ln_head"):
        feat = net.head[0].in_features
        net.head = nn.Sequential(nn.Linear(feat, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, action_dim))
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["frames", "difference"])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4])
    p.add_argument("--updates", type=int, default=600)
    p.add_argument("--k", type=int, default=4, help="the co-training offset (the small preset's cotrain_offset)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data, train_mask, test_mask = bs.load_data(argparse.Namespace(out_dir=args.out_dir, task=None))
    px, act, k = data["pixels"], data["action"], args.k
    e_all, t_all = bs.offset_pairs(px.shape[1] - 1, k, train_mask.nonzero().flatten())
    e_te, t_te = bs.offset_pairs(px.shape[1] - 1, k, test_mask.nonzero().flatten())
    held_obs, held_goal = px[e_te[:256], t_te[:256]], px[e_te[:256], t_te[:256] + k]
    marks = {1, 25, 50, 100, 200, 400, args.updates}

    for variant in args.variants:
        for lr in args.lrs:
            t0 = time.time()

            @torch.no_grad()
            def watch(i: int, net, loss: torch.Tensor, variant=variant, lr=lr, t0=t0) -> None:
                if i not in marks:
                    return
                was_training = net.training
                net.eval()
                trunk = net.trunk(net.inputs(held_obs, held_goal))
                hidden, out = net.head[:-1](trunk), net.head(trunk)
                net.train(was_training)
                dead_trunk, dead_head = (float((h.sum(0) == 0).float().mean()) for h in (trunk, hidden))
                print(f"{variant} seed {args.seed} lr {lr:g} update {i}: batch loss {float(loss):.3f}, output spread "
                      f"{float(out.std(0).mean()):.4f}, dead trunk features {dead_trunk:.2f}, dead head units "
                      f"{dead_head:.2f} ({time.time() - t0:.0f} s)", flush=True)

            bs.train_goal_bc(px, e_all, t_all, act[e_all, t_all], k, 32, lr, args.updates, args.seed, on_update=watch,
                             make_net=lambda v=variant: make_net(v, tuple(px.shape[-3:]), act.shape[-1]),
                             warmup=200 if variant == "warmup" else 0)


if __name__ == "__main__":
    main()
