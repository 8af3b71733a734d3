"""Write the golden files of tests/test_golden.py: one ``<agent>_<obs>.safetensors`` per case.

Run it ONLY when a change is meant to change the agents' maths (see README.md here)::

    python tests/golden/make_golden.py            # all 8 cases, from the latentrl that imports
    python tests/golden/make_golden.py rnd_state  # some cases

The cases are defined in tests/test_golden.py (imported from here), so the files and the test
cannot drift apart. The files record the git commit of the source tree ``latentrl`` was imported
from; the script refuses a tree with uncommitted changes to the package unless ``--allow-dirty``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for test_golden

from test_golden import CASES, GOLDEN_DIR, compact, run_case  # noqa: E402

PACKAGE_DIRS = ("src", "agents", "world_models", "envs", "replay", "training", "control", "configs")


def source_tree() -> tuple[Path, str, bool]:
    """The repository ``latentrl.agents`` is imported from, its HEAD commit and whether the package is dirty."""
    import latentrl.agents

    agents_dir = Path(os.path.realpath(latentrl.agents.__file__)).parent
    root = Path(subprocess.check_output(["git", "-C", str(agents_dir), "rev-parse", "--show-toplevel"], text=True)
                .strip())
    commit = subprocess.check_output(["git", "-C", str(root), "rev-parse", "HEAD"], text=True).strip()
    status = subprocess.check_output(["git", "-C", str(root), "status", "--porcelain", "--", *PACKAGE_DIRS],
                                     text=True)
    return root, commit, bool(status.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help="<agent>_<obs> cases to write (default: all)")
    parser.add_argument("--allow-dirty", action="store_true", help="write from a package with uncommitted changes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as tests/conftest.py does for the test

    import latentrl.agents

    root, commit, dirty = source_tree()
    print(f"latentrl.agents: {os.path.realpath(latentrl.agents.__file__)}")
    print(f"source tree {root} at {commit}{' (DIRTY)' if dirty else ''}; torch {torch.__version__}")
    if dirty and not args.allow_dirty:
        sys.exit("the package has uncommitted changes; commit them, or pass --allow-dirty")

    wanted = set(args.cases) or {f"{a}_{o}" for a, o in CASES}
    unknown = wanted - {f"{a}_{o}" for a, o in CASES}
    if unknown:
        sys.exit(f"unknown cases {sorted(unknown)}; valid: {[f'{a}_{o}' for a, o in CASES]}")
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for agent, obs_type in CASES:
        case = f"{agent}_{obs_type}"
        if case not in wanted:
            continue
        tensors, config = run_case(agent, obs_type)
        # One metadata key: safetensors writes several in a random order, and the files should be byte-reproducible.
        metadata = {"golden": json.dumps({"commit": commit + ("-dirty" if dirty else ""), "torch": torch.__version__,
                                          "case": case, "config": dataclasses.asdict(config)}, sort_keys=True)}
        path = GOLDEN_DIR / f"{case}.safetensors"
        save_file({k: v.contiguous() for k, v in compact(tensors)[0].items()}, str(path), metadata=metadata)
        params = sum(k.startswith("param/") for k in tensors)
        metrics = sum(k.startswith("metric/") for k in tensors)
        print(f"{path.name}: {params} params/buffers, {metrics} metric values, {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
