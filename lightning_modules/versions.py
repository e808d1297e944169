"""The library releases the CLI was verified with, where it depends on more than their public API.

``parser_errors`` reads jsonargparse's English error messages, and ``wandb_logger`` edits the
arguments Lightning's ``WandbLogger`` keeps for ``wandb.init``: a release that changes either
would turn a clear error line into a confusing one, silently. Each package is pinned in
``pyproject.toml`` to the range below, and ``check_verified_versions`` (run first by every
``train.py``/``merge.py`` command) refuses an installation outside it with one line, so a
forced upgrade fails at once and by name, not later in a user's run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import version

#: package -> (oldest, newest) major.minor release verified, and what depends on it. Keep in
#: step with the pins in pyproject.toml (``>=oldest,<newest + 1 minor``). Verified: the tests of
#: the error lines (tests/test_parser_errors.py, test_bad_input.py, test_cli_bad_input.py,
#: test_cli_internals.py) pass on jsonargparse 4.51, 4.52 and 4.53, and fail on 4.50 and before
#: (other wording; an error raised while instantiating not chained to its cause); Lightning 2.6.
VERIFIED = {
    "jsonargparse": ("4.51", "4.53", "its error messages are rewritten by lightning_modules/parser_errors.py"),
    "lightning": ("2.6", "2.6", "lightning_modules/wandb_logger.py edits WandbLogger's wandb.init arguments"),
}


class UnverifiedVersionError(RuntimeError):
    """An installed package outside the range the CLI was verified with."""


def _major_minor(release: str) -> tuple[int, int]:
    """``"4.53.0"`` -> ``(4, 53)``; a pre-release's suffix (``"2.7.0rc1"``) is ignored."""
    numbers = [int(part) for part in re.findall(r"\d+", release)[:2]]
    return numbers[0], numbers[1] if len(numbers) > 1 else 0


def check_verified_versions(installed: Callable[[str], str] | None = None) -> None:
    """Raise ``UnverifiedVersionError`` naming the first package outside its verified range.

    Args:
        installed: the installed release of a distribution, by name (default:
            ``importlib.metadata.version``).
    """
    installed = installed or version
    for package, (oldest, newest, reliance) in VERIFIED.items():
        found = installed(package)
        place = _major_minor(found)
        if _major_minor(oldest) <= place <= _major_minor(newest):
            continue
        relation = "newer" if place > _major_minor(newest) else "older"
        major, minor = _major_minor(newest)
        pin = f"{package}>={oldest},<{major}.{minor + 1}"
        raise UnverifiedVersionError(
            f"{package} {found} is {relation} than the verified {oldest}-{newest} (pinned in pyproject.toml; "
            f"{reliance}): install a verified release, pip install '{pin}'"
        )
