"""This process's place in a torchrun launch, read from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK), without torch: a command can ask before it imports torch or joins a process group."""

import os

__all__ = ["env_local_rank", "env_rank", "env_world_size"]


def env_rank() -> int:
    """This process's rank (RANK), 0 for a plain launch."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 for a plain launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK), 0 for a plain launch."""
    return int(os.environ.get("LOCAL_RANK", "0"))
