"""``lightning_modules.python_api.evaluate`` on several processes, as a user's script calls it.

    python tests/ddp_scripts/python_evaluate.py OUT_DIR DEVICES POOL.json DATA.json

Merges the pool (simple average) and evaluates the merged backbone with a DDP ``Trainer`` of
``DEVICES`` CPU processes (Lightning starts the others by running this script again), one image
a batch. Every process writes the report ``evaluate`` returned to ``OUT_DIR/rank<r>.json``; rank
0 writes the report files to ``OUT_DIR/report``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch import Trainer

from lightning_modules.python_api import evaluate, model_pool  # the repository is on PYTHONPATH (the test sets it)
from merging import SimpleAverage, merge_backbone

out, devices = Path(sys.argv[1]), int(sys.argv[2])
pool = model_pool(json.loads(Path(sys.argv[3]).read_text()))
paths = json.loads(Path(sys.argv[4]).read_text())
merged = merge_backbone(pool, SimpleAverage(), progress=False)
trainer = Trainer(
    accelerator="cpu", devices=devices, strategy="ddp", logger=False, enable_progress_bar=False, enable_model_summary=False
)
report = evaluate(merged, list(paths), pool, paths=paths, batch_size=1, num_workers=0, report_dir=out / "report", trainer=trainer)
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
