"""format/safe_pickle.py: the allowlist passes every kind of object our files and DeepSpeed's hold, and
refuses any other global (one line naming the file and the global) before it runs.

The legitimate objects are built the way the writers build them: DeepSpeed's own record classes
(fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum), param_shapes (torch.Size), state
dicts (OrderedDict), fp32/bf16/fp16 tensors, nn.Parameter, a dtype, and the RNG file's state
(io._rng_state: python, numpy and torch generators). Real saved checkpoints at several layouts and
precisions go through the same check in tests/integration/checkpointing/test_file_trust.py.
"""

import os
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from megatron_tokenformer.checkpointing import file_checks
from megatron_tokenformer.checkpointing.format.safe_pickle import ALLOWED_GLOBALS, UnsafeCheckpointError
from megatron_tokenformer.checkpointing.format.tensor_file import LazyTensor, TorchFile, materialize
from tests.helpers.tamper import PAYLOAD_GLOBAL, Payload


def _globals(path):
    """(module, name) of every GLOBAL / STACK_GLOBAL in the pickle of ``path`` (pickletools, nothing run)."""
    import pickletools
    import zipfile
    out = set()
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    strings, memo, last = [], {}, None   # the strings pushed (literal or from the memo), in order
    for op, arg, _ in pickletools.genops(data):
        pushed = None
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            pushed = arg
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = last
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed = memo.get(int(arg))
        elif op.name == "GLOBAL":
            out.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            out.add((strings[-2], strings[-1]))
        if pushed is not None:
            strings.append(pushed)
        if op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            last = pushed
    return out


def _legit_objects():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from megatron_tokenformer.checkpointing.io import _rng_state
    random.seed(3)
    np.random.seed(3)
    return {
        "model_states": {"module": OrderedDict(w=torch.randn(3, 2), b=torch.randn(2).bfloat16(),
                                               h=torch.randn(2).half()),
                         "param_shapes": [OrderedDict(w=torch.Size([3, 2]))], "ds_version": "0.19.8",
                         "tied": torch.nn.Parameter(torch.ones(2)), "iteration": 7, "none": None},
        "zero_shard": {"optimizer_state_dict": {
            "zero_stage": ZeroStageEnum.optimizer_states, "loss_scaler": LossScaler(1.0),
            "dynamic_loss_scaler": DynamicLossScaler(2 ** 16, 1000, 1, 2, False),  # holds dtype torch.float16
            "param_slice_mappings": [OrderedDict(w=fragment_address(numel=6, start=0))],
            "single_partition_of_fp32_groups": [torch.zeros(6)], "dtype": torch.float16,
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.zeros(6)}}}}},
        "rng": _rng_state(),
        "canonical": torch.randn(4, 3),
    }


@pytest.mark.parametrize("kind", ["model_states", "zero_shard", "rng", "canonical"])
def test_legit_files_pass_and_read_back(kind, tmp_path):
    obj = _legit_objects()[kind]
    path = str(tmp_path / f"{kind}.pt")
    torch.save(obj, path)
    assert _globals(path) <= ALLOWED_GLOBALS, _globals(path) - ALLOWED_GLOBALS
    assert file_checks.check_file(path) is None
    back = materialize(TorchFile(path).obj)
    if kind == "rng":  # the state the load restores, exactly
        assert back["python"] == obj["python"] and torch.equal(back["torch"], obj["torch"])
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back["numpy"], obj["numpy"]))
        assert all(torch.equal(back["tracker"][k], obj["tracker"][k]) for k in obj["tracker"])
    elif kind == "canonical":
        assert torch.equal(back, obj)
    elif kind == "zero_shard":
        maps = back["optimizer_state_dict"]["param_slice_mappings"][0]["w"]
        assert (maps.numel, maps.start) == (6, 0)


def test_payload_refused_before_it_runs(tmp_path):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "evil.pt")
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)}, path)
    problem = file_checks.check_file(path)
    assert problem == (f"{path}: refused: its pickle names {PAYLOAD_GLOBAL}, which no checkpoint of this project "
                       "or DeepSpeed holds; loading it could run code (nothing was loaded; see docs/checkpoints.md, "
                       "'Trust model')")
    with pytest.raises(UnsafeCheckpointError, match=PAYLOAD_GLOBAL):
        TorchFile(path)
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # the reference: plain loading runs it
    assert os.path.exists(marker)


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("target", [("builtins", "eval"), ("torch", "load"), ("numpy", "load"),
                                    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("subprocess", "Popen")])
def test_other_globals_refused_in_any_protocol(target, protocol, tmp_path):
    """A torch zip archive whose pickle names another global (GLOBAL opcode at protocol 0, the Python 2
    names protocol 2 writes, STACK_GLOBAL at 4), deep inside: refused with the name the pickle holds."""
    import importlib

    fn = getattr(importlib.import_module(target[0]), target[1])
    marker = str(tmp_path / "marker")

    class Call:
        def __reduce__(self):
            return (fn, (f"open({marker!r}, 'w')",)) if fn is eval else (fn, (marker,))

    path = str(tmp_path / "x.pt")
    # (protocol 0 writes persistent ids as text, which torch's own files never hold: no tensor there)
    obj = {"a": [1.5, {"deep": Call()}]} if protocol == 0 else {"a": [torch.zeros(1), {"deep": Call()}]}
    torch.save(obj, path, pickle_protocol=protocol)
    (bad,) = _globals(path) - ALLOWED_GLOBALS
    problem = file_checks.check_file(path)
    assert problem is not None and problem.startswith(f"{path}: refused: its pickle names {'.'.join(bad)},"), problem
    assert not os.path.exists(marker)


def test_lazy_tensors_read_nothing_until_asked(tmp_path):
    path = str(tmp_path / "t.pt")
    torch.save({"w": torch.arange(6.0).view(2, 3)}, path)
    t = TorchFile(path).obj["w"]
    assert isinstance(t, LazyTensor) and torch.equal(t.load(), torch.arange(6.0).view(2, 3))

