"""Shared, lazily built training runs for the checkpoint tests (each runs once per session)."""


import pytest

from tests.helpers import ckpt_runs


@pytest.fixture(scope="session")
def ckpt_workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpointing"))


@pytest.fixture(scope="session")
def straight_runs(ckpt_workdir):
    """layout -> (losses of iterations 1..20, save dir with steps 10 and 20); built on first use."""
    cache = {}

    def get(layout):
        if layout not in cache:
            name = "straight_%d%d%d" % layout
            cache[layout] = ckpt_runs.train(ckpt_workdir, name, layout, 20, ["--save-interval", "10"])
        return cache[layout]

    return get
