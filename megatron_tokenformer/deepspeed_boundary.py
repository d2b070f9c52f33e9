"""The DeepSpeed boundary: which DeepSpeed and torch versions this code is tested with, and the check at start.

Several modules reach into DeepSpeed 0.19 internals (ZeRO fragment mappings in the resharding load,
``deepspeed.ops.__compatible_ops__``, the CPU accelerator's fp16 probe, the checkpoint engine's
``save``) and into torch 2.13's (``distributed_c10d`` defaults, the NCCL environment variables). Those
are correct for the versions below; another version may move them. This module is where such
reaching-in is meant to gather; for now it holds the tested range and the start-up check.

Decision (docs/training.md): a version outside the tested range is **warned about, not refused**
-- one line naming both versions and the range, on rank 0, before anything runs. The pins in
setup.py keep ``pip install`` inside the range, so only a deliberate install (``--no-deps``, a source
build) reaches the warning, and refusing would stop someone testing the next release.

The versions are read from the installed packages' metadata (:func:`importlib.metadata.version`),
so the check imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Tuple

__all__ = ["TESTED_DEEPSPEED", "TESTED_TORCH", "TESTED_PYTHON", "parse_version", "in_range",
           "version_warning", "installed_version", "check_versions"]

#: [lowest, first untested) release of each package the code is tested with (setup.py pins the same)
TESTED_DEEPSPEED: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((0, 19), (0, 20))
TESTED_TORCH: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((2, 13), (2, 14))
#: the lowest Python (torch 2.13 requires 3.10; setup.py's python_requires says the same)
TESTED_PYTHON: Tuple[int, int] = (3, 10)


def parse_version(text: str) -> Optional[Tuple[int, ...]]:
    """The numeric release of a version string: ``"2.13.0+cpu"`` -> (2, 13, 0), ``"0.19.8"`` -> (0, 19, 8),
    ``"2.14.0.dev20260101"`` -> (2, 14, 0); None when it does not start with a number."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    if not m:
        return None
    return tuple(int(part) for part in m.group(1).split("."))


def in_range(version: Tuple[int, ...], tested: Tuple[Tuple[int, ...], Tuple[int, ...]]) -> bool:
    """``lowest <= version < first_untested`` (compared on the release numbers)."""
    low, high = tested
    return low <= version < high


def _range_text(tested) -> str:
    low, high = tested
    return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def version_warning(deepspeed_version: Optional[str], torch_version: Optional[str]) -> Optional[str]:
    """One line when either version is outside its tested range (or unreadable), naming both; None when
    both are inside."""
    outside = False
    for text, tested in ((deepspeed_version, TESTED_DEEPSPEED), (torch_version, TESTED_TORCH)):
        parsed = parse_version(text) if text else None
        if parsed is None or not in_range(parsed, tested):
            outside = True
    if not outside:
        return None
    return (f"warning: DeepSpeed {deepspeed_version or 'not installed'} and torch {torch_version or 'not installed'}: "
            f"this code is tested with deepspeed{_range_text(TESTED_DEEPSPEED)} and torch{_range_text(TESTED_TORCH)} "
            f"(it reaches into their internals: checkpoints, ZeRO state, process groups); continuing")


def installed_version(package: str) -> Optional[str]:
    """The installed version of ``package`` from its metadata, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_versions(emit: Callable[[str], None], lookup: Callable[[str], Optional[str]] = installed_version
                   ) -> Optional[str]:
    """Compare the installed DeepSpeed and torch with the tested range; ``emit`` the one-line warning when
    outside. Returns the line (or None)."""
    line = version_warning(lookup("deepspeed"), lookup("torch"))
    if line is not None:
        emit(line)
    return line
