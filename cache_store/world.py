"""The processes of one command under torchrun (both stages use it: caching splits shards over ranks, a
sweep splits its groups). torchrun says everything through the environment (WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the same command line runs as one process or as many.

Ranks share work through the store itself (each writes its own shards or run folders), so the only
collective they need is a barrier. That runs over gloo on every device: it needs no GPU binding, and
the CPU tests use it with two processes.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

# A barrier waits for the slowest rank to finish its part of a split: far longer than torch's default 30
# minutes on a large task. A rank that dies does not leave the others waiting: torchrun stops them all.
BARRIER_TIMEOUT = datetime.timedelta(days=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that writes what all ranks share (a manifest, a summary)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value):
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out


def current_world() -> World:
    """This process's place among torchrun's, joining the process group on first use (one process: no
    group at all)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if world.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return world
