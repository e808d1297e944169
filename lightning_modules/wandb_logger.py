"""Weights & Biases logging that works without a network or an account."""

from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


def wandb_credentials_available() -> bool:
    """An API key in the environment or in ``~/.netrc`` for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger, offline by itself when there are no credentials or
    ``WANDB_MODE=offline``; sync later with ``wandb sync <save_dir>/wandb/offline-run-*``.

    Args:
        project: W&B project.
        name: run name (default: W&B picks one).
        save_dir: where the run files go.
        group: W&B group, e.g. one per task or per method comparison.
        tags: W&B tags.
        offline: force offline (true) or online (false); default: decide from the environment.
        log_model: upload checkpoints as W&B artifacts.
    """

    def __init__(
        self,
        project: str = "convnext-fusion",
        name: str | None = None,
        save_dir: str = "outputs",
        group: str | None = None,
        tags: list[str] | None = None,
        offline: bool | None = None,
        log_model: bool = False,
    ) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_available()
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            group=group,
            tags=tags,
            offline=offline,
            log_model=log_model,
        )
        # Lightning always passes wandb's deprecated `anonymous` setting (as None), and wandb warns
        # that it "has no effect" on every run; leaving it out changes nothing else. No public
        # argument leaves it out: this edits Lightning's private `_wandb_init` (verified on the
        # releases of lightning_modules/versions.py); a release without it brings the warning back.
        wandb_init = vars(self).get("_wandb_init")
        if isinstance(wandb_init, dict):
            wandb_init.pop("anonymous", None)
