"""Two check 3 readings on the same goals and starts, goal by goal: success, mean final distance, the paired
difference of final distances with its standard error, and success on the near and far halves of the goals (split
at the median start distance).

    python docs/bench_active_inference/last_step_2026-12-08/paired.py A/results.json B/results.json
"""

import json
import statistics
import sys

RADIUS = 0.05  # the benchmark's --success-radius


def success(distances: list[float], rows: list[int]) -> float:
    return sum(distances[i] < RADIUS for i in rows) / len(rows)


def compare(a: dict, b: dict) -> None:
    starts = a["start_distance"]
    median = statistics.median(starts)
    every = list(range(len(starts)))
    near = [i for i in every if starts[i] <= median]
    far = [i for i in every if starts[i] > median]
    for row in ("agent", "risk_only"):
        x, y = a[row]["final_distance"], b[row]["final_distance"]
        diff = [q - p for p, q in zip(x, y, strict=True)]
        se = statistics.stdev(diff) / len(diff) ** 0.5
        print(f"{row}: success {success(x, every):.2f} -> {success(y, every):.2f}; distance "
              f"{statistics.mean(x):.3f} -> {statistics.mean(y):.3f}; paired diff {statistics.mean(diff):+.3f} "
              f"(s.e. {se:.3f}); near half {success(x, near):.2f} -> {success(y, near):.2f}, far half "
              f"{success(x, far):.2f} -> {success(y, far):.2f}")


if __name__ == "__main__":
    first, second = (json.load(open(path))["check3"] for path in sys.argv[1:3])
    compare(first, second)
