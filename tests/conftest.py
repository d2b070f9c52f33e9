"""Suite-wide pytest configuration: how the tests are spread over pytest-xdist workers.

The README's test command runs the suite on two workers (``-n 2 --dist loadgroup``): most tests start
training processes whose start-up is single-threaded, or wait on a launcher, a timeout or Slurm, so one
worker leaves about half of a 2-core machine idle. Every test is grouped with its module (module-scoped
fixtures -- the layout runs, the documented workflows, the rank pools -- are then built once), and the
modules that use the local Slurm cluster share one group: its fixture starts and stops the cluster, so
they run one after the other on one worker.
"""

import pytest

SLURM_GROUP = "slurm"


def pytest_collection_modifyitems(config, items):
    slurm_modules = {item.module.__name__ for item in items if item.get_closest_marker("slurm") is not None}
    for item in items:
        module = item.module.__name__
        group = SLURM_GROUP if module in slurm_modules else module
        item.add_marker(pytest.mark.xdist_group(name=group))
