#!/usr/bin/env python
"""Zero-shot evaluation of a trained agent on rewards and goals it never saw:
``python scripts/eval_zero_shot.py checkpoint=runs/<run>/checkpoints/latest.pt tasks=walker/all``.

For each reward task: relabel 10,000 dataset transitions with the task reward from physics, infer
the task, roll out 10 deterministic episodes; prints a table and writes JSON, CSV and a bar chart.
``mode=goal`` evaluates goal reaching on stored states; ``--help`` lists the keys.
"""

from latentrl.training.cli import eval_main

if __name__ == "__main__":
    eval_main()
