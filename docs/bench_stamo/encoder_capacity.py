"""Can StaMo's encoder carry the reacher arm at all? Train it *supervised* on the joint angles and read held-out R^2.

A capacity check, not part of StaMo (whose encoder only ever sees the flow loss): if the encoder cannot learn
(sin, cos) of the joint angles when it is trained on them directly, no decoder loss will put them into its
tokens. Variants, each from the same initial seed, AdamW 3e-4, batch 32, a linear head on the features:

- ``stem``: the conv patch stem's 64 x 128 features, flattened;
- ``stem+blocks``: the same after the encoder's two self-attention blocks;
- ``queries``: the whole encoder with learned-query compression (tokens [2, 128]);
- ``transposed``: the whole encoder with the reference's transposed compression (tokens [2, 128]).

    python docs/bench_stamo/encoder_capacity.py --data /tmp/stamo     # the dir of `bench_stamo.py data`

Writes ``encoder_capacity.json`` beside this file (``--out``)."""

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


def run(data, train, test, variant: str, updates: int, seed: int) -> list[dict]:
    from latentrl.agents.stamo import StaMoAgent

    torch.manual_seed(seed)
    compression = "queries" if variant == "queries" else "transposed"
    enc = StaMoAgent(StaMoAgent.make_config("small", compression=compression), (3, 64, 64), 2).world_model.encoder

    def features(x):
        if variant in ("queries", "transposed"):
            return enc(x).flatten(1)
        h = enc.stem(x)
        if variant == "stem+blocks":
            for block in enc.blocks:
                h = block(h)
        return h.flatten(1)

    reacher = bs.TASKS["reacher-easy"]
    y = reacher.features(reacher.coords(data["physics"]))  # (sin, cos) of both joint angles
    x_train, y_train = data["pixels"][train].flatten(0, 1), y[train].flatten(0, 1)
    x_test, y_test = data["pixels"][test].flatten(0, 1)[::4], y[test].flatten(0, 1)[::4]
    with torch.no_grad():
        width = features(x_train[:1]).shape[1]
    head = torch.nn.Linear(width, 4)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=3e-4)
    g = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.time()
    for i in range(updates):
        idx = torch.randint(len(x_train), (32,), generator=g)
        loss = (head(features(x_train[idx])) - y_train[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % 100 == 0:
            with torch.no_grad():
                pred = torch.cat([head(features(x_test[j:j + 256])) for j in range(0, len(x_test), 256)])
            r2 = bs.r2(pred, y_test)
            curve.append({"updates": i + 1, "train_loss": float(loss.detach()), "heldout_r2": float(r2.mean()),
                          "heldout_r2_per_output": [round(float(v), 3) for v in r2]})
            print(f"{variant:12s} {i + 1:4d} updates: held-out R^2 {float(r2.mean()):.3f} "
                  f"{curve[-1]['heldout_r2_per_output']} ({time.time() - t0:.0f} s)", flush=True)
    return curve


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the --out-dir of `bench_stamo.py data` (episodes.pt)")
    p.add_argument("--updates", type=int, default=400)
    p.add_argument("--variants", default="stem,stem+blocks,queries,transposed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "encoder_capacity.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, train, test = bs.load_data(argparse.Namespace(out_dir=args.data, task=None))
    variants = {v: run(data, train, test, v, args.updates, args.seed) for v in args.variants.split(",")}
    results = {"data": args.data, "updates": args.updates, "seed": args.seed,
               "targets": "sin q1, cos q1, sin q2, cos q2", "variants": variants}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
