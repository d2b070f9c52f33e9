"""Every collective of the package goes through tensor_parallel/mappings.py, with its tensor on the
communication device (the local CUDA device under NCCL, where a CPU tensor cannot be all-reduced).

On a CPU machine the communication device is the CPU, like every default tensor, so a call site that
forgets the device would pass unnoticed. Here the communication device is set to ``meta`` -- a device
no tensor lands on by default -- and the collective replaced by a recorder: every call site must hand
over a tensor on ``meta``. The multi-process training tests run with the guard on
(tests/helpers/train_runs.py sets MEGATRON_TOKENFORMER_CHECK_COLLECTIVES=1).
"""

import ast
import os

import pytest
import torch
import torch.distributed as dist

from megatron_tokenformer import parallel_state
from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.language_model import TokenformerLM
from megatron_tokenformer.tensor_parallel import mappings
from megatron_tokenformer.testing import spawn_gloo
from tests.helpers.paths import REPO_ROOT


def _python_files():
    roots = [os.path.join(REPO_ROOT, "megatron_tokenformer"), os.path.join(REPO_ROOT, "tools")]
    files = [os.path.join(REPO_ROOT, "pretrain_tokenformer.py")]
    for root in roots:
        for d, _, names in os.walk(root):
            files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    return files


def _raw_collective_calls(path):
    """(line, text) of every call ``<x>.<collective>(...)`` where <x> is ``dist`` or ``torch.distributed``."""
    tree = ast.parse(open(path).read(), path)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in mappings.RAW_COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed"):
                hits.append((node.lineno, ast.unparse(node.func)))
    return hits


def test_no_module_calls_torch_distributed_collectives_directly():
    offenders = []
    choke_point = os.path.join(REPO_ROOT, "megatron_tokenformer", "tensor_parallel", "mappings.py")
    testing = os.path.join(REPO_ROOT, "megatron_tokenformer", "testing.py")
    for path in _python_files():
        if path in (choke_point, testing):
            continue
        offenders += [f"{os.path.relpath(path, REPO_ROOT)}:{line} {text}" for line, text in _raw_collective_calls(path)]
    assert not offenders, "collectives outside the choke point:\n" + "\n".join(offenders)


def test_the_scan_sees_a_direct_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as dist\n"
                   "dist.all_reduce(torch.ones(1))\ntorch.distributed.barrier()\n")
    assert [line for line, _ in _raw_collective_calls(str(bad))] == [3, 4]


def test_communication_device_choice():
    assert parallel_state.choose_communication_device(False, None) == torch.device("cpu")
    assert parallel_state.choose_communication_device(True, 3) == torch.device("cuda", 3)
    with pytest.raises(ValueError):
        parallel_state.choose_communication_device(True, None)


@pytest.fixture
def meta_communication_device(monkeypatch):
    """Communication device ``meta``, two pretend ranks, collectives recorded instead of run."""
    seen = []

    def recorder(kind, tensor, group=None):
        seen.append((kind, group, tensor.device))
        return torch.zeros(tensor.shape, dtype=tensor.dtype)  # result as if communicated (on CPU)

    monkeypatch.setattr(parallel_state, "_COMMUNICATION_DEVICE", torch.device("meta"))
    monkeypatch.setattr(mappings, "_collective", recorder)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 2)
    return seen


def test_parameter_counting_communicates_on_the_communication_device(meta_communication_device):
    from megatron_tokenformer.training.logging import count_model_parameters
    cfg = TokenformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=32,
                            qkv_num_param_tokens=4, proj_num_param_tokens=4, ffn_num_param_tokens=8)
    count_model_parameters(TokenformerLM(cfg, seed=1), cfg)
    assert meta_communication_device == [("all_reduce", "world", torch.device("meta"))]


def test_exit_agreement_communicates_on_the_communication_device(meta_communication_device, monkeypatch):
    from megatron_tokenformer.training.loop import _agree_on_exit
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    _agree_on_exit("SIGTERM", torch.device("cpu"))
    assert meta_communication_device == [("all_reduce_max", "world", torch.device("meta"))]


def test_loss_averaging_communicates_on_the_communication_device(meta_communication_device):
    from megatron_tokenformer.training.loop import _dp_average
    out = _dp_average(torch.tensor([1.0, 3.0]))
    assert meta_communication_device == [("all_reduce", "data", torch.device("meta"))]
    assert out.device == torch.device("cpu")


def test_checkpoint_agreement_and_barrier_communicate_on_the_communication_device(meta_communication_device):
    from megatron_tokenformer.checkpointing import io
    io._agree(True)
    io._barrier()
    assert meta_communication_device == [("all_reduce_max", "world", torch.device("meta")),
                                         ("all_reduce", "world", torch.device("meta"))]


@pytest.fixture
def guard(monkeypatch):
    for name in mappings.RAW_COLLECTIVES:  # restored after the test
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, getattr(dist, name))
    monkeypatch.setattr(mappings, "_GUARD", False)
    mappings.install_collective_guard()
    yield


def test_guard_refuses_a_tensor_on_another_device(guard, monkeypatch):
    monkeypatch.setattr(parallel_state, "_COMMUNICATION_DEVICE", torch.device("meta"))
    with pytest.raises(RuntimeError, match="communication device is meta"):
        mappings.all_reduce_over(torch.ones(2), "world")


def test_guard_refuses_a_direct_call_from_a_package_module(guard):
    namespace = {"__name__": "megatron_tokenformer.training.somewhere", "dist": dist, "torch": torch}
    exec(compile("def f():\n    dist.all_reduce(torch.ones(1))\n", "<package module>", "exec"), namespace)
    with pytest.raises(RuntimeError, match="called directly from megatron_tokenformer.training.somewhere"):
        namespace["f"]()


def _guarded_two_ranks(rank, world):
    mappings.install_collective_guard()
    parallel_state.set_communication_device(torch.device("cpu"))
    parallel_state.initialize_model_parallel(1, 1)
    # through the choke point: summed over the world and the data-parallel group
    assert mappings.all_reduce_over(torch.tensor([rank + 1.0]), "world").item() == 3.0
    assert mappings.all_reduce_over(torch.tensor([float(rank)]), "data", op="max").item() == 1.0
    mappings.barrier()
    # other libraries' calls (DeepSpeed's, here torch's own helper module) are not ours to police
    namespace = {"__name__": "deepspeed.comm.torch", "dist": dist, "torch": torch}
    exec(compile("def f():\n    t = torch.ones(1)\n    dist.all_reduce(t)\n    return t\n", "<other>", "exec"),
         namespace)
    assert namespace["f"]().item() == 2.0
    namespace = {"__name__": "megatron_tokenformer.x", "dist": dist, "torch": torch}
    exec(compile("def f():\n    dist.barrier()\n", "<package module>", "exec"), namespace)
    with pytest.raises(RuntimeError, match="called directly"):
        namespace["f"]()


@pytest.mark.slow
def test_guarded_collectives_on_two_ranks():
    spawn_gloo(_guarded_two_ranks, 2)
