"""latentrl.replay: the one replay buffer every agent shares (memory or on-disk), and offline datasets."""

from latentrl.replay.buffer import DatasetError, ReplayBuffer

__all__ = ["DatasetError", "ReplayBuffer"]
