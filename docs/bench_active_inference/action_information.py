"""How much must a world model resolve to pass check 2 (the scorer ranking) on point_mass-easy_visible?

A one-off diagnostic (issue 14), run as ``python docs/bench_active_inference/action_information.py 30``; it wrote
``action_information.json`` beside it. For held-out ``(s_t, a_t)`` after random-action histories it renders
``o_{t+1}`` under ``a_t`` and under 1000 uniform random candidate actions from the same physics state, with the true
simulator and renderer (a perfect world model; 64x64, action repeat 4, as the benchmark). It reports how many
candidates render the very same frame (ties no pixel model can break), and the pixel MSE (on [0, 1]) between the
true frame and the 20th-percentile candidate's: a model whose one-step prediction error is not well below that
cannot put the true action in the best 20%.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from latentrl.envs import get_task

task = get_task("point_mass-easy_visible")
env = task.make_dm_env(seed=0)
physics = env.physics
rng = np.random.default_rng(0)
REPEAT, CANDIDATES = 4, 1000
CASES = int(sys.argv[1]) if len(sys.argv) > 1 else 30


def render() -> np.ndarray:
    return physics.render(64, 64, camera_id=task.default_camera).astype(np.int16)


def step(action: np.ndarray) -> None:
    for _ in range(REPEAT):
        physics.set_control(action)
        physics.step()


def step_from(state: np.ndarray, action: np.ndarray) -> np.ndarray:
    with physics.reset_context():
        physics.set_state(state)
    step(action)
    return render()


ties, gaps, copy_mse, changed = [], [], [], []
started = time.time()
for case in range(CASES):
    env.reset()
    for _ in range(rng.integers(5, 200)):  # a random-action history: the mass moving at some velocity
        step(rng.uniform(-1, 1, 2))
    state = physics.get_state().copy()
    frame_t = render()
    true_next = step_from(state, rng.uniform(-1, 1, 2))
    distance = np.array([((step_from(state, rng.uniform(-1, 1, 2)) - true_next) ** 2).mean()
                         for _ in range(CANDIDATES)]) / 255.0**2
    ties.append(float((distance == 0).mean()))
    gaps.append(float(np.percentile(distance, 20)))
    copy_mse.append(float(((frame_t - true_next) ** 2).mean() / 255.0**2))
    changed.append(int((true_next != frame_t).any(-1).sum()))
    print(f"{case}: identical {ties[-1]:.3f}, pixels changed by the step {changed[-1]}, 20th-percentile candidate "
          f"MSE {gaps[-1]:.2e}, copy MSE {copy_mse[-1]:.2e} ({time.time() - started:.0f} s)", flush=True)
out = {"cases": CASES, "candidates": CANDIDATES, "mean_identical_fraction": float(np.mean(ties)),
       "mean_pixels_changed_by_a_step": float(np.mean(changed)),
       "median_20th_percentile_candidate_mse": float(np.median(gaps)), "median_copy_mse": float(np.median(copy_mse)),
       "ties": ties, "gaps": gaps, "copy_mse": copy_mse}
print(json.dumps({k: v for k, v in out.items() if not isinstance(v, list)}))
(Path(__file__).parent / "action_information.json").write_text(json.dumps(out, indent=1))
