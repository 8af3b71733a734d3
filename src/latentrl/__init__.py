"""latentrl: latent-space agents that learn from pixels in simulated robots and act zero-shot.

The subpackages are the architecture (see DESIGN.md):

- :mod:`latentrl.envs`          ``make_env``, tasks as reward functions of the physics state
- :mod:`latentrl.replay`        the one ``ReplayBuffer`` (memory or on-disk), offline datasets
- :mod:`latentrl.world_models`  the ``WorldModel`` protocol and shared encoders
- :mod:`latentrl.agents`        the ``Agent`` / ``Policy`` protocols, one module per agent, ``make_agent``
- :mod:`latentrl.training`      the one training loop, evaluation, logging, checkpoints
- :mod:`latentrl.control`       robot control loops
"""

import os

# Headless rendering by default; must be set before mujoco or dm_control is first imported.
# MUJOCO_GL=osmesa is the fallback where EGL is missing.
os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"


def load_policy(path, *, device="cpu", explore=False):
    """The Policy of a model directory (``config.json`` + ``model.safetensors``), rebuilt with no env,
    optimizer or replay buffer; see :func:`latentrl.agents.model_files.load_policy`."""
    from latentrl.agents.model_files import load_policy as _load_policy

    return _load_policy(path, device=device, explore=explore)
