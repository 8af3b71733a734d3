#!/usr/bin/env python
"""Train an agent: ``python scripts/train_agent.py agent=rnd env=walker-walk [key=value ...]``.

Online by default (collect -> replay buffer -> update); ``data=<dataset folder>`` trains offline.
``--help`` lists every key. Writes metrics.csv, TensorBoard logs, checkpoints and evaluation videos
under ``runs/`` (or ``run_dir=...``); ``resume=true`` continues a killed run.
"""

from latentrl.training.cli import train_main

if __name__ == "__main__":
    train_main()
