"""tests/conftest.py::pytest_configure: the processes the suite starts cache the bytecode of what they import
(the README's test command installs with ``pip install --no-compile``; CI machines often set
``PYTHONDONTWRITEBYTECODE``): each module is compiled once, by its first importer."""

import importlib.util
import os
import subprocess
import sys


def test_a_process_the_suite_starts_caches_the_modules_it_imports(tmp_path):
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ
    source = tmp_path / "fresh_module.py"
    source.write_text("VALUE = 7\n")
    out = subprocess.run([sys.executable, "-c", "import fresh_module; print(fresh_module.VALUE)"], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr
    assert os.path.isfile(importlib.util.cache_from_source(str(source)))  # where the next importer looks


def test_the_worker_running_the_tests_caches_too():
    assert sys.dont_write_bytecode is False  # read by a worker at start-up from the environment it inherited
