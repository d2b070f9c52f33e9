"""tests/conftest.py::pytest_configure: the processes the suite starts cache the bytecode of what they import
(the README's test command installs with ``pip install --no-compile``; CI machines often set
``PYTHONDONTWRITEBYTECODE``), and the repository's own modules are compiled before the first test."""

import importlib.util
import os
import subprocess
import sys

from tests.helpers.paths import REPO_ROOT


def test_a_process_the_suite_starts_caches_the_modules_it_imports(tmp_path):
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ
    source = tmp_path / "fresh_module.py"
    source.write_text("VALUE = 7\n")
    out = subprocess.run([sys.executable, "-c", "import fresh_module; print(fresh_module.VALUE)"], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr
    assert os.path.isfile(importlib.util.cache_from_source(str(source)))  # where the next importer looks


def test_the_repositorys_modules_are_compiled_before_the_first_test():
    for module in ("megatron_tokenformer/launch.py", "megatron_tokenformer/training/pretrain.py",
                   "tests/helpers/train_runs.py", "tools/expand_checkpoint.py"):
        source = os.path.join(REPO_ROOT, module)
        cached = importlib.util.cache_from_source(source)
        assert os.path.isfile(cached) and os.path.getmtime(cached) >= os.path.getmtime(source), module
