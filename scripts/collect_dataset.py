#!/usr/bin/env python
"""Collect a reward-free dataset with an exploration agent (ExoRL style):
``python scripts/collect_dataset.py agent=rnd env=walker-walk steps=100000 out=data/walker-rnd``.

The agent trains online on its intrinsic reward while collecting; every step it took is saved to
``out`` with physics states, ready for ``ReplayBuffer.load`` and ``train_agent.py data=<out>``.
"""

from latentrl.training.cli import collect_main

if __name__ == "__main__":
    collect_main()
