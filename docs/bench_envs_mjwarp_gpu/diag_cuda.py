"""Per-step differences between the CUDA and the CPU mjwarp env (the loop of test_cuda_env_matches_cpu_env).

One-off script behind cuda_vs_cpu_h200.txt; run as ``python docs/bench_envs_mjwarp_gpu/diag_cuda.py`` on a
CUDA machine.
"""

import torch

from latentrl.envs import make_env


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.cpu().float() - b.float()).abs().max().item()


def mean_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.cpu().float() - b.float()).abs().mean().item()


for task in ["cheetah-run", "walker-walk"]:
    obs = ("pixels", "state", "physics")
    gpu = make_env(task, backend="mjwarp", obs=obs, num_envs=4, seed=0, device="cuda")
    cpu = make_env(task, backend="mjwarp", obs=obs, num_envs=4, seed=0, device="cpu")
    nq = gpu._nq
    a, b = gpu.reset(), cpu.reset()
    print(task, "reset: physics", max_diff(a["physics"], b["physics"]), "pixels", mean_diff(a["pixels"], b["pixels"]))
    torch.manual_seed(0)
    for t in range(50):
        action = cpu.action_spec.rand()
        a["action"], b["action"] = action.cuda(), action
        a, b = gpu.step(a)["next"], cpu.step(b)["next"]
        if t % 5 == 4 or t < 3:
            print(
                f"{task} step {t + 1}: |dq| {max_diff(a['physics'][:, :nq], b['physics'][:, :nq]):.2e} "
                f"|dv| {max_diff(a['physics'][:, nq:], b['physics'][:, nq:]):.2e} "
                f"reward {max_diff(a['reward'], b['reward']):.2e} pixels {mean_diff(a['pixels'], b['pixels']):.3f}",
                flush=True,
            )
    gpu.close()
    cpu.close()
