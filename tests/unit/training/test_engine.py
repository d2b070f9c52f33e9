"""Optimizer choice (training/engine.py: apex FusedAdam only when its CUDA extension loads)."""

import sys
import types

import pytest

from megatron_tokenformer.training import engine as engine_lib


def _fake_apex(monkeypatch, *, extension: bool, applier_available: bool = True):
    """An apex install in sys.modules; ``extension=False``: the Python-only build (no amp_C)."""
    apex = types.ModuleType("apex")
    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = type("FusedAdam", (), {})
    mta = types.ModuleType("apex.multi_tensor_apply")
    mta.multi_tensor_applier = types.SimpleNamespace(available=applier_available)
    for name, mod in (("apex", apex), ("apex.optimizers", optimizers), ("apex.multi_tensor_apply", mta)):
        monkeypatch.setitem(sys.modules, name, mod)
    if extension:
        amp_c = types.ModuleType("amp_C")
        amp_c.multi_tensor_adam = object()
        monkeypatch.setitem(sys.modules, "amp_C", amp_c)
    else:
        monkeypatch.setitem(sys.modules, "amp_C", None)  # import amp_C raises ImportError


def test_apex_with_its_cuda_extension_is_used(monkeypatch):
    _fake_apex(monkeypatch, extension=True)
    assert engine_lib.apex_available(cuda_available=True)


def test_python_only_apex_is_not_used(monkeypatch):
    _fake_apex(monkeypatch, extension=False)
    assert not engine_lib.apex_available(cuda_available=True)


def test_apex_whose_applier_is_unavailable_is_not_used(monkeypatch):
    _fake_apex(monkeypatch, extension=True, applier_available=False)
    assert not engine_lib.apex_available(cuda_available=True)


def test_no_apex_without_cuda(monkeypatch):
    _fake_apex(monkeypatch, extension=True)
    assert not engine_lib.apex_available(cuda_available=False)


def test_no_apex_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)
    assert not engine_lib.apex_available(cuda_available=True)
