"""Where the repository lives, and how tests import a tool or benchmark script (``tools/*.py`` and
``benchmarks/*.py`` are scripts, not packages)."""

import importlib.util
import os
import sys
from types import ModuleType

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS_DIR = os.path.join(REPO_ROOT, "tools")


BENCHMARKS_DIR = os.path.join(REPO_ROOT, "benchmarks")


def _load_script(folder: str, name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as a module (cached in ``sys.modules`` under ``name``)."""
    return _load_script(TOOLS_DIR, name)


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module (cached in ``sys.modules`` under ``name``)."""
    return _load_script(BENCHMARKS_DIR, name)
