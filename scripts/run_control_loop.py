#!/usr/bin/env python
"""Drive a robot with a trained policy in real time:
``python scripts/run_control_loop.py model=<run>/model robot=sim task=reacher-easy rate=50 duration=60``.

Prints a live status line and a summary table; writes telemetry.csv / .json and TensorBoard logs
(``out=``), and with ``record=<dir>`` every step as a dataset for ``train_agent.py data=<dir>``.
``backend=onnx`` runs the policy exported by ``scripts/export_policy.py``. ``--help`` lists every key.
"""

from latentrl.control.cli import run_main

if __name__ == "__main__":  # SimRobot starts its process with spawn: the guard is required
    run_main()
