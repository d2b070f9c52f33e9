"""The suite's pytest-xdist groups (tests/conftest.py): a group runs on one worker, so that a module's or a
shared folder's fixtures are built once and no two workers drive one Slurm cluster or one set of simulated
hosts at the same time (two did, when pytest 9 silently dropped xdist's own group suffix: each built its
own cluster and saw the other's jobs)."""

import os
import re
import subprocess
import sys

from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_of_names_the_shared_folders_the_slurm_modules_and_else_the_module():
    harness = "tests/integration/multinode/test_harness.py"
    assert conftest.group_of(harness + "::test_x") == harness
    slurm2 = "tests/integration/multinode/test_slurm_multinode.py"  # marked slurm, on its own two-node cluster
    assert conftest.group_of(slurm2 + "::test_w") == slurm2
    assert conftest.group_of("tests/integration/training/test_layouts.py::test_y[a@b]") == "layouts"
    assert conftest.group_of("tests/integration/multinode/test_launch_paths.py::test_z[pdsh]") == "layouts"
    assert conftest.group_of("tests/integration/checkpointing/sub/test_z.py::T::test") == "checkpointing"
    assert conftest.group_of("tests/unit/data/test_indexed.py::test_a") == "unit-data"
    # a test marked slurm (on itself or by its module's pytestmark) is in the Slurm group, its module's other
    # tests in the module's group
    assert conftest.group_of("tests/unit/test_launch.py::test_srun") == conftest.SLURM_GROUP
    assert conftest.group_of("tests/unit/test_launch.py::test_cpu_batch_script_under_sbatch[x]") == conftest.SLURM_GROUP
    assert conftest.group_of("tests/unit/test_launch.py::test_mpirun") == "tests/unit/test_launch.py"
    assert conftest.group_of("tests/examples/test_progressive_scaling_slurm.py::test_b") == conftest.SLURM_GROUP
    # the modules holding rank pools share one group (one worker spawns the pools)
    assert conftest.group_of("tests/unit/tensor_parallel/test_layers.py::test_e[tp2]") == conftest.POOL_GROUP
    assert conftest.group_of("tests/unit/test_parallel_state.py::test_f") == conftest.POOL_GROUP
    assert conftest.group_of("tests/unit/test_fileio.py::test_c") == "tests/unit/test_fileio.py"
    assert conftest.group_of("tests/unit/data_extra.py::test_d") == "tests/unit/data_extra.py"


def test_the_tests_of_a_group_run_on_one_worker():
    modules = ["tests/unit/test_fileio.py", "tests/unit/data/test_samplers.py", "tests/unit/data/test_blending.py"]
    modules = [m for m in modules if os.path.exists(os.path.join(ROOT, m))]
    assert len(modules) >= 2, modules
    # the last module's group is moved to the front of the queue (as the long groups are): the tests the
    # workers run must still be the ones scheduled
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-n", "2",
                        "--dist", "loadgroup", *modules], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TESTS_GROUPS_FIRST": conftest.group_of(modules[-1] + "::t")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    workers = {}
    for worker, nodeid in re.findall(r"\[(gw\d+)\][^\n]*? PASSED (\S+)", r.stdout):
        workers.setdefault(conftest.group_of(nodeid), set()).add(worker)
    assert set(workers) == {conftest.group_of(m + "::t") for m in modules}, r.stdout[-3000:]
    assert all(len(w) == 1 for w in workers.values()), workers
