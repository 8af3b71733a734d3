"""How far 50 agent steps can take the point mass: a PD controller on the true state (2026-12-02).

point_mass-easy (the visible variant has the same physics), action repeat 4, 50 agent steps from each reset, goal
positions uniform in [-0.25, 0.25]^2 (the bench draws its goals from held-out states instead), success = final
distance < 0.05. Printed: kp, kd, success over 50 goals, mean final distance. Measured: (20, 5) 0.82 / 0.021,
(50, 10) 0.90 / 0.012, (100, 20) 0.94 / 0.007, (10, 3) 0.84 / 0.023.

    MUJOCO_GL=egl python docs/bench_active_inference/pd_oracle.py
"""

import numpy as np
from dm_control import suite


def main() -> None:
    rng = np.random.default_rng(0)
    env = suite.load("point_mass", "easy", task_kwargs={"random": 0})
    physics = env.physics
    for kp, kd in [(20, 5), (50, 10), (100, 20), (10, 3)]:
        success, distances = [], []
        for _ in range(50):
            env.reset()
            goal = rng.uniform(-0.25, 0.25, 2)
            for _ in range(50):
                x, v = physics.data.qpos[:2].copy(), physics.data.qvel[:2].copy()
                action = np.clip(kp * (goal - x) - kd * v, -1, 1)
                for _ in range(4):
                    env.step(action)
            d = float(np.linalg.norm(physics.data.qpos[:2] - goal))
            distances.append(d)
            success.append(d < 0.05)
        print(kp, kd, np.mean(success), np.mean(distances))


if __name__ == "__main__":
    main()
