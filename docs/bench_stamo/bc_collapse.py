"""Why does the co-training check's 5-part BC of seed 0 stay at the mean action? Trains that BC net
(``bench_stamo.train_goal_bc``: pairs k = 4 steps apart from every training episode, true actions) as
``bench_stamo.cotraining`` does, at the given learning rates, and prints along the way its batch loss, the spread of
its outputs over 256 held-out pairs, and the share of conv-trunk features and head units that are inactive for
every one of those pairs (dead ReLUs). Reads only the episodes of ``--out-dir`` (no autoencoder: this condition
never uses one).

    python docs/bench_stamo/bc_collapse.py --out-dir /tmp/stamo --lrs 1e-3 3e-4 --updates 600
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "scripts"))

import bench_stamo as bs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
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
    held = torch.cat([px[e_te[:256], t_te[:256]], px[e_te[:256], t_te[:256] + k]], 1).float() / 127.5 - 1.0
    marks = {1, 25, 50, 100, 200, 400, args.updates}

    @torch.no_grad()
    def watch(i: int, net, loss: torch.Tensor) -> None:
        if i not in marks:
            return
        trunk = net.trunk(held)
        hidden, out = net.head[:2](trunk), net.head(trunk)
        dead_trunk, dead_head = (float((h.sum(0) == 0).float().mean()) for h in (trunk, hidden))
        print(f"seed {args.seed} lr {lr:g} update {i}: batch loss {float(loss):.3f}, output spread "
              f"{float(out.std(0).mean()):.4f}, dead trunk features {dead_trunk:.2f}, dead head units "
              f"{dead_head:.2f} ({time.time() - t0:.0f} s)", flush=True)

    for lr in args.lrs:
        t0 = time.time()
        bs.train_goal_bc(px, e_all, t_all, act[e_all, t_all], k, 32, lr, args.updates, args.seed, on_update=watch)


if __name__ == "__main__":
    main()
