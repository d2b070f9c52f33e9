"""Suite-wide pytest configuration: how the tests are spread over pytest-xdist workers.

The README's test command runs the suite on two workers (``-n 2 --dist loadgroup``). Most tests are
CPU-bound and gain little from a second worker on a 2-core machine, but a growing part of the suite
waits: on a collective timeout after a simulated host is killed or cut off, on Slurm's time-limit
warning and requeue hold, on a stage's ``afterok`` dependency. On one worker those waits add up with
the CPU time of everything else; on two they run beside it.

Every test gets an ``xdist_group``, so that what its fixtures build is built once:

* the tests under a folder whose ``conftest.py`` holds session-scoped runs (the checkpointing and interop
  runs, the simulated hosts -- with the two-node Slurm cluster built on them -- and the one-host layout
  runs the multi-host launch paths are compared with, the data fixtures) share that folder's group;
* the other modules that use a Slurm cluster (the ``slurm`` marker: the one-node cluster of
  ``../shared``, whose fixture writes the machine's ``slurm.conf``) share one group and run one after
  the other on one worker;
* every other test is grouped with its module (module-scoped fixtures: rank pools, documented workflows).

Without xdist (``python -m pytest tests``) the groups are ignored and the suite runs as before.
"""

import os

import pytest

SLURM_GROUP = "slurm"

# folder (relative to tests/) -> group: session-scoped fixtures live in these folders' conftest.py
_SHARED_FOLDERS = {
    os.path.join("integration", "checkpointing"): "checkpointing",
    os.path.join("integration", "interop"): "interop",
    os.path.join("integration", "multinode"): "hosts",
    # the one-host layout runs that the multi-host launch paths are compared with
    os.path.join("integration", "training", "test_layouts.py"): "hosts",
    os.path.join("unit", "data"): "unit-data",
}

_TESTS = os.path.dirname(os.path.abspath(__file__))


def _shared_folder_group(item):
    rel = os.path.relpath(str(item.path), _TESTS)
    for prefix, group in _SHARED_FOLDERS.items():
        if rel == prefix or rel.startswith(prefix + os.sep):
            return group
    return None


def pytest_collection_modifyitems(config, items):
    slurm_modules = {item.module.__name__ for item in items if item.get_closest_marker("slurm") is not None}
    for item in items:
        group = _shared_folder_group(item)
        if group is None:
            group = SLURM_GROUP if item.module.__name__ in slurm_modules else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(name=group))
