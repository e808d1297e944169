"""Stand-ins for SLURM's ``sbatch`` and ``srun``, put first on ``PATH`` by a test; each records
what it was given in a folder of its own.

- ``sbatch``: records its arguments (``sbatch-<n>.args``, one a line) and the script it was
  given (``sbatch-<n>.script``) and answers as sbatch does, ``Submitted batch job <1234 + n>``
  (with ``--parsable``: the job id alone). ``SBATCH_STANDIN_FAIL=<n>`` refuses the n-th call and after
  (counted from 0) with sbatch's error line and exit status 1.
- ``srun``: records its arguments (``srun-<SLURM_ARRAY_TASK_ID>.args``), then either runs the
  command after its options (``SRUN_STANDIN_RUN=1``: a one-node, one-task step, as on one
  machine), or stands in for it: writes the export ``SRUN_STANDIN_EXPORTS`` if given and exits
  with ``SRUN_STANDIN_STATUS`` (default 0).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

SBATCH = """#!/bin/bash
record={record}
count=$(ls "$record" | grep -c '^sbatch-.*[.]args$' || true)
printf '%s\\n' "$@" > "$record/sbatch-$count.args"
cp "${{@: -1}}" "$record/sbatch-$count.script"
if [[ -n "$SBATCH_STANDIN_FAIL" && $count -ge $SBATCH_STANDIN_FAIL ]]; then
    echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
    exit 1
fi
if [[ " $* " == *" --parsable "* ]]; then echo "$((1234 + count))"; else echo "Submitted batch job $((1234 + count))"; fi
"""
SRUN = """#!/bin/bash
printf '%s\\n' "$@" > {record}/srun-$SLURM_ARRAY_TASK_ID.args
if [[ -n "$SRUN_STANDIN_RUN" ]]; then
    while [[ $1 == --* ]]; do shift; done
    exec "$@"
fi
if [[ -n "$SRUN_STANDIN_EXPORTS" ]]; then mkdir -p "$SRUN_STANDIN_EXPORTS" && echo '{{}}' > "$SRUN_STANDIN_EXPORTS/config.json"; fi
exit ${{SRUN_STANDIN_STATUS:-0}}
"""


def install(root: Path) -> tuple[Path, Path]:
    """The stand-ins in ``root/bin``; that folder (to put first on ``PATH``) and the record folder."""
    bin_dir, record = root / "bin", root / "record"
    bin_dir.mkdir(parents=True)
    record.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN)):
        (bin_dir / name).write_text(text.format(record=shlex.quote(str(record))))
        (bin_dir / name).chmod(0o755)
    return bin_dir, record


def path_with(bin_dir: Path) -> str:
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def submissions(record: Path) -> list[tuple[list[str], str]]:
    """Each sbatch call, in order: its arguments and the script's text."""
    calls = sorted(record.glob("sbatch-*.args"), key=lambda path: int(path.stem.split("-")[1]))
    return [(path.read_text().splitlines(), path.with_suffix(".script").read_text()) for path in calls]
