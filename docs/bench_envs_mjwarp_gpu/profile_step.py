"""Where a batched walker step spends its time on the GPU: the control-step graph, the render graph, the rest.

One-off script behind the 'Where a step's time goes' table of docs/bench_envs_mjwarp.md; run as
``python docs/bench_envs_mjwarp_gpu/profile_step.py 4096 16384`` on a CUDA machine. Writes profile.json to
``$OUT`` (or the current directory).
"""

import json
import os
import sys
import time

import torch

from latentrl.envs import make_env


def timed_ms(fn, repeats: int = 20) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def profile(n: int) -> dict:
    env = make_env("walker-walk", backend="mjwarp", obs=("pixels",), image_size=64, num_envs=n, device="cuda")
    state = {"td": env.reset()}

    def step():
        state["td"]["action"] = env.action_spec.rand()
        state["td"] = env.step(state["td"])["next"]

    for _ in range(5):
        step()
    result = {"step_ms": timed_ms(step)}
    with env._on_device():
        result["physics_ms"] = timed_ms(lambda: env._launch("control_step", env._control_step_kernels))
        result["render_ms"] = timed_ms(lambda: env._launch("render", env._render_kernels))
        result["pixels_ms"] = timed_ms(env._pixels)
        result["reward_ms"] = timed_ms(lambda: env._batched.reward(env._view))
    result["fps"] = n / result["step_ms"] * 1e3
    result["graphs"] = env._use_graphs
    result["max_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    env.close()
    torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    results = {}
    for n in map(int, sys.argv[1:]):
        results[n] = profile(n)
        print(n, json.dumps(results[n]), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "profile.json"), "w") as f:
        json.dump(results, f, indent=1)
