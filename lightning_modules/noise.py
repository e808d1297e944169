"""Messages the libraries print that tell our users nothing they can act on, silenced here.

Each filter names the message it drops and why; everything else still gets through.
"""

from __future__ import annotations

import logging
import warnings


class _DropLightningTips(logging.Filter):
    """Lightning advertises its cloud products ("💡 Tip: ... litlogger / litmodels") on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def silence_known_noise() -> None:
    """Install the filters (idempotent)."""
    # rank_zero_info logs through whichever of these two Lightning imported last.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropLightningTips) for existing in logger.filters):
            logger.addFilter(_DropLightningTips())
    # Lightning 2.6's own pytree helper calls an API torch deprecated; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
    # The configs choose num_workers on purpose (0 for the small in-memory quickstart tasks, where
    # worker processes cost more than they bring); Lightning's CPU-count heuristic misfires there.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*", category=Warning)
