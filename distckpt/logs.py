"""Logging: every record from a distckpt logger carries the rank that emitted it.

The library never prints; each module logs to its own ``distckpt.<module>`` logger, whose
filter adds ``record.rank`` so that a job's handler can write ``%(rank)s`` in its format
and tell ranks apart in one interleaved log.
"""

from __future__ import annotations

import logging
import os

_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def current_rank() -> int | None:
    """This process's rank: from an initialised process group, else the launcher's env."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except (ImportError, RuntimeError, ValueError):
        pass
    for var in _RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


class RankFilter(logging.Filter):
    """Adds ``record.rank`` (an int, or ``"-"`` outside a launched job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "rank"):
            rank = current_rank()
            record.rank = "-" if rank is None else rank
        return True


_FILTER = RankFilter()


def get_logger(name: str) -> logging.Logger:
    """The module's logger, with the rank filter (logger filters do not apply to records
    of child loggers, so each module's logger gets it)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
