"""Test-wide settings and shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Small networks on a shared 2-core machine run fastest (and reproducibly) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def walker_dataset(tmp_path_factory) -> Path:
    """A tiny reward-free walker dataset with pixels, states and physics, written by collect_dataset.py
    (RND, smoke preset, 150 env steps); shared by the offline-training tests."""
    from latentrl.training.cli import collect_main

    root = tmp_path_factory.mktemp("walker_dataset")
    out = root / "walker-rnd"
    collect_main(["preset=smoke", "log.progress=false", "log.tensorboard=false", "eval.video=false",
                  "env.obs=[pixels,state,physics]", "steps=150", f"out={out}", f"run_dir={root / 'collect'}"])
    return out
