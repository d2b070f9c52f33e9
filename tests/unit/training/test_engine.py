"""Optimizer choice (training/engine.py: apex FusedAdam only when its CUDA extension loads)."""

import sys
import types

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


# --------------------------------------------------------------------------- DeepSpeed config: bf16


def _config_args(**overrides):
    base = dict(global_batch_size=32, micro_batch_size=1, gradient_accumulation_steps=32, clip_grad=1.0,
                zero_stage=1, fp16=False, bf16=False, deepspeed_json=None)
    base.update(overrides)
    return engine_lib.DeepSpeedOptions(**base)


def test_bf16_accumulates_and_reduces_gradients_in_fp32():
    cfg = engine_lib.build_deepspeed_config(_config_args(bf16=True))
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["communication_data_type"] == "fp32"


def test_fp32_config_has_no_gradient_dtype_override():
    cfg = engine_lib.build_deepspeed_config(_config_args())
    assert "data_types" not in cfg and "communication_data_type" not in cfg


def test_users_gradient_dtype_wins():
    user = {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"}
    cfg = engine_lib.build_deepspeed_config(_config_args(bf16=True, deepspeed_json=user))
    assert cfg["data_types"] == {"grad_accum_dtype": "bf16"} and cfg["communication_data_type"] == "bf16"
    assert user == {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"}  # not modified


def test_deepspeed_reads_the_bf16_gradient_precision():
    """The config as DeepSpeed 0.19 reads it (ZeRO-1 + bf16 + fp32 accumulation: its BF16_Optimizer)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg = engine_lib.build_deepspeed_config(_config_args(bf16=True))
    ds = DeepSpeedConfig(cfg)
    import torch
    assert ds.grad_accum_dtype == "fp32" and ds.communication_data_type == torch.float32
    assert ds.bfloat16_config.enabled and ds.zero_optimization_stage == 1


# --------------------------------------------------------------------------- DeepSpeed config: throughput timer


def test_throughput_timer_is_off_as_deepspeed_reads_it():
    """DeepSpeed's default (enabled, synchronized) syncs the device twice per micro-batch; the generated
    config turns it off, read back by DeepSpeed's own parser and by the throughput timer it builds."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils.config import get_timers_config
    from deepspeed.utils.timer import ThroughputTimer
    assert get_timers_config({}).enabled  # DeepSpeed's default: the reason for the setting
    for precision in ({}, {"bf16": True}):
        cfg = engine_lib.build_deepspeed_config(_config_args(**precision))
        assert cfg["timers"] == {"throughput": {"enabled": False}}
        ds = DeepSpeedConfig(cfg)
        assert ds.timers_config.enabled is False
        timer = ThroughputTimer(ds.timers_config, batch_size=1)
        timer.start()
        assert not timer.started  # a disabled timer never starts (so never synchronises)


def test_users_throughput_timer_wins():
    user = {"timers": {"throughput": {"enabled": True, "synchronized": False}}}
    cfg = engine_lib.build_deepspeed_config(_config_args(deepspeed_json=user))
    assert cfg["timers"] == {"throughput": {"enabled": True, "synchronized": False}}
