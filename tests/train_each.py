"""``python train.py fit --config configs/train/<task>.yaml ARGS`` for several tasks, one after the
other, in one interpreter (one start of Python, torch and Lightning instead of one per task):

    python tests/train_each.py TASK [TASK ...] -- ARGS

Each task goes through ``train.main`` exactly as ``train.py`` runs it, with its own W&B run. The
first task that fails ends the script with that failure (an input error: one ``error:`` line and
exit status 1, as ``train.py`` has).
"""

from __future__ import annotations

import sys
from pathlib import Path

import wandb

from train import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def train_each(tasks: list[str], args: list[str]) -> None:
    for task in tasks:
        print(f"=== {task}", flush=True)
        main(["fit", "--config", str(CONFIGS / f"{task}.yaml"), *args])
        wandb.finish()  # the next task's logger starts a run of its own, as in a process of its own


if __name__ == "__main__":
    separator = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    train_each(sys.argv[1:separator], sys.argv[separator + 1 :])
