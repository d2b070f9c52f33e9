"""Suite-wide pytest configuration: how the tests are spread over pytest-xdist workers.

The README's test command runs the suite on three workers (``-n 3 --dist loadgroup``) on a 2-core
machine. Most tests are CPU-bound (their multi-rank runs use both cores), but a part of the suite waits:
on a collective timeout after a simulated host is killed or cut off, on Slurm's time-limit warning,
requeue hold and scheduling passes, on a stage's ``afterok`` dependency. On one worker those waits add up
with the CPU time of everything else; with more workers than cores they run beside it (on two workers
the cores were still idle ~11% of the time).

Every test belongs to a group (:func:`group_of`), and a group runs on one worker, so that what its
fixtures build is built once:

* the tests under a folder whose ``conftest.py`` holds session-scoped runs (the checkpointing and interop
  runs, the data fixtures) share that folder's group; the one-host layout runs (``layout_pool``) are
  shared by test_layouts.py and the multi-host launch paths, one group;
* each multi-node module (tests/integration/multinode) is a group of its own: they mostly wait (on a
  collective timeout after a host is lost, on Slurm), so they run beside each other, each worker with
  its own simulated hosts (the session fixture ``two_hosts``) and clusters;
* the other tests that use a Slurm cluster (the ``slurm`` marker, on the module or the test: the one-node
  cluster of ``../shared``, whose fixture writes the machine's ``slurm.conf``) share one group and run one
  after the other on one worker; the other tests of their modules are grouped with their module;
* the modules that hold rank pools (``dist_pool.pool_fixture``: spawned gloo ranks kept for the session,
  one set per worker and size) share one group, so that one worker spawns them once;
* every other test is grouped with its module (module-scoped fixtures: documented workflows, runs).

The groups are handed to pytest-xdist by :func:`pytest_xdist_make_scheduler` (``tests/test_suite_groups.py``
checks that a module's tests run on one worker). Without xdist (``python -m pytest tests``) the groups are
ignored and the suite runs as before.
"""

import ast
import compileall
import os
import sys

SLURM_GROUP = "slurm"
POOL_GROUP = "rank-pools"

# folder (relative to tests/) -> group: session-scoped fixtures live in these folders' conftest.py
_SHARED_FOLDERS = {
    "integration/checkpointing": "checkpointing",
    "integration/interop": "interop",
    # the one-host layout runs (session fixture layout_pool) and the multi-host launch paths compared with them
    "integration/training/test_layouts.py": "layouts",
    "integration/multinode/test_launch_paths.py": "layouts",
    "unit/data": "unit-data",
}

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)


def _source(module_path: str, cache={}) -> str:
    """The text of the test module at ``module_path`` (relative to the repository; "" when unreadable)."""
    if module_path not in cache:
        try:
            with open(os.path.join(_ROOT, module_path), encoding="utf-8") as f:
                cache[module_path] = f.read()
        except OSError:
            cache[module_path] = ""
    return cache[module_path]


def _slurm_tests(module_path: str, cache={}):
    """The tests of the module at ``module_path`` marked ``slurm``: ``all`` (a module-level ``pytestmark``
    names the marker) or the set of the marked functions' names."""
    if module_path not in cache:
        try:
            tree = ast.parse(_source(module_path))
        except SyntaxError:
            tree = ast.Module(body=[], type_ignores=[])
        marked = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets) \
                    and "pytest.mark.slurm" in ast.unparse(node.value):
                marked = "all"
                break
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and any(ast.unparse(d).startswith("pytest.mark.slurm") for d in node.decorator_list):
                marked.add(node.name)
        cache[module_path] = marked
    return cache[module_path]


def group_of(nodeid: str) -> str:
    """The xdist group of the test ``nodeid`` (``tests/unit/x.py::test_y[p]``): a shared folder's group, the
    Slurm group, or the test's module."""
    module_path = nodeid.split("::", 1)[0]
    rel = module_path[len("tests/"):] if module_path.startswith("tests/") else module_path
    for prefix, group in _SHARED_FOLDERS.items():
        if rel == prefix or rel.startswith(prefix + "/"):
            return group
    if rel.startswith("integration/multinode/"):
        return module_path  # its own simulated hosts and two-node cluster, not the machine's one-node cluster
    slurm = _slurm_tests(module_path)
    test = nodeid.split("::")[-1].split("[", 1)[0]
    if slurm == "all" or test in slurm:
        return SLURM_GROUP
    if "dist_pool.pool_fixture(" in _source(module_path):  # holds a rank pool
        return POOL_GROUP
    return module_path


# groups started first, longest first (worker-seconds of a full run), so that none ends the run alone on one
# worker; the others follow in xdist's order (most tests first)
LONG_GROUPS = (SLURM_GROUP, "layouts", "tests/integration/multinode/test_slurm_multinode.py", "checkpointing",
               POOL_GROUP,
               "tests/examples/test_parallel_sweep.py", "tests/integration/multinode/test_host_faults.py",
               "tests/integration/operations/test_signals.py",
               "tests/examples/test_cpu_repro.py", "tests/integration/multinode/test_runner_signals.py",
               "tests/integration/multinode/test_network_checks.py", "tests/unit/test_launch.py", "interop",
               "tests/integration/training/test_context_parallel.py",
               "tests/integration/training/test_convergence_precision.py",
               "tests/integration/training/test_bf16_accumulation.py", "tests/test_zygote.py",
               "tests/docs/test_interop_commands.py", "tests/docs/test_workflow_commands.py",
               "tests/examples/test_cpu_quickstart.py",
               "tests/integration/operations/test_failures.py", "tests/integration/training/test_exits.py",
               "tests/integration/training/test_bad_token_ids.py", "tests/test_suite_groups.py",
               "tests/integration/multinode/test_harness.py")


# the folders whose modules the suite's processes import (the package, the tests' helpers, tools, benchmarks)
_SOURCE_FOLDERS = ("megatron_tokenformer", "tests", "tools", "benchmarks", "examples")


def pytest_configure(config):
    """Let the suite's processes cache bytecode (on the controller only, before the workers start).

    The suite starts some hundreds of Python processes (ranks under real launchers, on simulated hosts and
    Slurm nodes, tools). Wherever writing bytecode is off (``PYTHONDONTWRITEBYTECODE``, as on the CI machine)
    each would compile every module it imports again: the package's ~100 (~0.5 CPU-s) and, as the README's test
    command installs with ``pip install --no-compile`` (pip would compile all ~17,700 modules of the environment,
    ~45 s, of which the suite imports a fraction), torch's and DeepSpeed's (~6 CPU-s). So the variable is unset
    for the processes the suite starts: each module is compiled once, by its first importer, and cached next to
    its source (written atomically: concurrent importers are safe). The repository's own modules are compiled
    here first. Python still compares each ``.pyc`` with its source, so an edited module is recompiled as usual."""
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller did it
        return
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # inherited by the workers and everything they start
    sys.dont_write_bytecode = False
    for folder in _SOURCE_FOLDERS:
        compileall.compile_dir(os.path.join(_ROOT, folder), quiet=2)


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's ``loadgroup`` reads the group from a suffix its worker hook appends to each node id,
    which pytest 9 no longer lets a plugin change (the id is computed): the groups are decided here, on the
    controller, from the node ids themselves (``-n N`` alone groups the same way). The long groups start
    first."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            # the long groups to the front of the queue (the collection itself keeps its order: the workers
            # are sent indices into it)
            if not getattr(self, "_long_groups_first", False):
                self._long_groups_first = True
                first = os.environ.get("TESTS_GROUPS_FIRST")  # tests/test_suite_groups.py
                for group in reversed(first.split(",") if first else LONG_GROUPS):
                    if group in self.workqueue:
                        self.workqueue.move_to_end(group, last=False)
            super()._assign_work_unit(node)

    return GroupScheduling(config, log)
