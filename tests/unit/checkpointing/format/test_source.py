"""The CheckpointSource protocol: a step folder's view, the growth view and the Net2Net view implement it,
and each one's plan_parts agrees with its read."""

import pytest
import torch

from megatron_tokenformer.checkpointing.format import files
from megatron_tokenformer.checkpointing.format.source import CheckpointSource
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.checkpointing.grow import GrownView, plan_growth
from megatron_tokenformer.checkpointing.net2net import WidenedView, plan_widening
from tests.helpers.deepspeed_layout import PARAMS, full, write_step_folder

EMB, KEYP, LN = list(PARAMS)


@pytest.fixture()
def view(tmp_path):
    write_step_folder(str(tmp_path / files.step_tag(7)))
    with CheckpointView(str(tmp_path / files.step_tag(7))) as v:
        yield v


def _assemble(parts, shape):
    """What CanonicalWriter.write_parts would write, rebuilt in memory from the copies and fills."""
    copies, fills = parts
    out = bytearray(int(torch.tensor(shape).prod()) * 4)
    for path, offset, nbytes, out_off in copies:
        with open(path, "rb") as f:
            f.seek(offset)
            out[out_off:out_off + nbytes] = f.read(nbytes)
    t = torch.frombuffer(out, dtype=torch.float32).clone()
    for elem, values in fills:
        t[elem:elem + values.numel()] = values
    return t.view(shape)


def test_view_is_a_source(view):
    assert isinstance(view, CheckpointSource)
    for name in (EMB, LN):
        assert torch.equal(_assemble(view.plan_parts(name, "exp_avg"), view.params[name].shape),
                           view.read(name, "exp_avg"))


def test_grown_view_is_a_source(view):
    grown = GrownView(view, plan_growth(view.config, ffn_num_param_tokens=5))
    assert isinstance(grown, CheckpointSource) and grown.reset_optimizer is False
    want = torch.cat([full(KEYP, "fp32"), torch.zeros(2, full(KEYP, "fp32").shape[1])])  # new keys are zero
    assert torch.equal(grown.read(KEYP), want) and grown.params[KEYP].shape == (5, 4)
    assert grown.plan_parts(KEYP) is None                      # partitioned along dim 1: read whole
    assert torch.equal(_assemble(grown.plan_parts(EMB, "exp_avg"), grown.params[EMB].shape), view.read(EMB, "exp_avg"))
    assert grown.report()["token_counts"] == {"ffn_num_param_tokens": {"old": 3, "new": 5}}


def test_widened_view_is_a_source(tmp_path):
    from megatron_tokenformer.checkpointing.format import canonical, metadata
    from megatron_tokenformer.checkpointing.format.entries import ParamEntry

    meta = write_step_folder(str(tmp_path / "unused"))
    meta["model_config"].update(model_type="transformer", ffn_hidden_size=16)
    tensors = {EMB: full(EMB, "fp32")[:5], "layers.0.mlp.dense_4h_to_h.bias": full(LN, "exp_avg"), LN: full(LN, "fp32")}
    step = str(tmp_path / "global_step7")
    w = canonical.CanonicalWriter(step, fsync=False)
    for name, t in tensors.items():
        w.write(name, "fp32", t)
    entries = [ParamEntry(n, tuple(t.shape), "float32", 0 if n == EMB else None, n == EMB) for n, t in tensors.items()]
    w.finish(dict(meta, kind=metadata.KIND_CANONICAL, params=[e.to_dict() for e in entries], optimizer_state_keys=[]))
    with CheckpointView(step) as view:
        widened = WidenedView(view, plan_widening(view.config))    # no width change: a plain copy
        assert isinstance(widened, CheckpointSource) and widened.reset_optimizer is False
        for name, t in tensors.items():
            assert torch.equal(widened.read(name), t)
            assert torch.equal(_assemble(widened.plan_parts(name), t.shape), t)
        with pytest.raises(KeyError):
            widened.plan_parts(EMB, "exp_avg")


def test_incomplete_class_is_not_a_source(view):
    class ReadOnly:
        config, params, state_keys, keys, reset_optimizer = None, {}, [], ["fp32"], False

        def read(self, name, key="fp32"):
            return torch.zeros(1)

    assert not isinstance(ReadOnly(), CheckpointSource)
