"""errors.py: every exception class the package defines derives from TokenformerError, keeps the builtin it
derived from (``except ValueError`` / ``except RuntimeError`` still catch it) and carries the exit code the
process ends with (the table of training/supervision/failures.py)."""

import ast
import importlib
import os

import pytest

from megatron_tokenformer.errors import EXIT_BAD_INPUT, EXIT_FAILED, TokenformerError
from tests.helpers.paths import REPO_ROOT

PACKAGE_DIR = os.path.join(REPO_ROOT, "megatron_tokenformer")


def defined_exception_classes():
    """``(module, class name)`` of every top-level class of the package (interop/hf excluded: it is copied into
    Hugging Face exports and imports nothing of the package) whose name ends in Error or Failure."""
    found = []
    for folder, _, files in os.walk(PACKAGE_DIR):
        if os.path.join("interop", "hf") in folder:
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            with open(path) as f:
                tree = ast.parse(f.read())
            found += [(module, node.name) for node in tree.body
                      if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Failure"))]
    return sorted(found)


def test_the_walk_finds_the_known_errors():
    names = {name for _, name in defined_exception_classes()}
    assert {"ArgumentError", "SaveDirError", "TokenIdError", "NumericalFailure", "OverlapError"} <= names
    assert len(names) >= 21


@pytest.mark.parametrize("module, name", defined_exception_classes())
def test_every_package_error_derives_from_the_base(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, TokenformerError), f"{module}.{name}"
    if cls.__module__ not in ("megatron_tokenformer.errors", "megatron_tokenformer.cli"):  # the base, ToolError
        assert issubclass(cls, (ValueError, RuntimeError)), f"{module}.{name}: the builtin it always derived from"
    assert cls.exit_code in (EXIT_BAD_INPUT, EXIT_FAILED)


@pytest.mark.parametrize("module, name, builtin, code, every_rank", [
    ("megatron_tokenformer.checkpointing.save_dir", "SaveDirError", RuntimeError, 2, False),
    ("megatron_tokenformer.checkpointing.save_dir", "SaveFailedError", RuntimeError, 1, True),
    ("megatron_tokenformer.checkpointing.file_checks", "CheckpointFileError", ValueError, 2, False),
    ("megatron_tokenformer.data.batch_check", "TokenIdError", ValueError, 2, True),
    ("megatron_tokenformer.training.supervision.numerics", "NumericalFailure", RuntimeError, 1, False),
    ("megatron_tokenformer.arguments", "ArgumentError", ValueError, 2, True),
])
def test_the_failure_table(module, name, builtin, code, every_rank):
    """The rows of training/supervision/failures.py's table, as the classes now carry them."""
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, builtin)
    assert (cls.exit_code, cls.every_rank_prints) == (code, every_rank)
