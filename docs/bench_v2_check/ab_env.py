"""Frames/s of make_env's walker-walk 64x64 pixels with W workers (argv[1]): median of 5 segments of 200
steps. Run alternately with the old code (PYTHONPATH at a d7dbecc shim package) and the new, for the
same-machine A/B in docs/benchmarks.md ("Contracts v2: behaviour check")."""

import sys
import time

import torch

import latentrl.envs as E

torch.set_num_threads(1)

W = int(sys.argv[1])
env = E.make_env("walker-walk", obs=("pixels",), image_size=64, num_envs=W, num_workers=W)
td = env.reset()
for _ in range(20):
    td = env.step(td.set("action", env.action_spec.rand()))["next"]
segs = []
for _segment in range(5):
    t = time.perf_counter()
    for _ in range(200):
        td = env.step(td.set("action", env.action_spec.rand()))["next"]
    segs.append(200 * W / (time.perf_counter() - t))
segs.sort()
print(f"{E.__file__.split('/')[2]} W={W} median frames/s {segs[2]:.0f} all {[round(x) for x in segs]}")
env.close()
