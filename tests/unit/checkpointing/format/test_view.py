"""CheckpointView on a DeepSpeed-layout folder built in the test: full tensors, row ranges, TP slices for
other layouts, byte locations, against the full tensors the folder was built from."""

import pytest
import torch

from megatron_tokenformer.checkpointing.format import files
from megatron_tokenformer.checkpointing.format.view import CheckpointView, open_checkpoint
from tests.helpers.deepspeed_layout import KEYS, PARAMS, VOCAB, full, write_step_folder

EMB, KEYP, LN = list(PARAMS)


@pytest.fixture()
def view(tmp_path):
    step = tmp_path / files.step_tag(7)
    write_step_folder(str(step))
    with CheckpointView(str(step)) as v:
        yield v


def test_attributes(view):
    assert view.kind == "deepspeed" and view.iteration == 7 and view.keys == ["fp32", "exp_avg", "exp_avg_sq"]
    assert view.config.vocab_size == VOCAB and view.layout["data_parallel_size"] == 2
    assert view.reset_optimizer is False and view.report() == {}
    assert view.source_name(KEYP) == KEYP and view.describe(KEYP) == "copied"


@pytest.mark.parametrize("key", list(KEYS))
def test_read_full_tensors(view, key):
    assert torch.equal(view.read(EMB, key), full(EMB, key)[:VOCAB])   # vocabulary padding trimmed
    assert torch.equal(view.read(KEYP, key), full(KEYP, key))          # joined along dim 1
    assert torch.equal(view.read(LN, key), full(LN, key))              # replicated: one copy


def test_read_rows(view):
    assert torch.equal(view.read_rows(EMB, "exp_avg", 1, 4), full(EMB, "exp_avg")[1:4])
    assert torch.equal(view.read_rows(KEYP, "fp32", 1, 3), full(KEYP, "fp32")[1:3])
    with pytest.raises(ValueError, match="outside"):
        view.read_rows(EMB, "fp32", 0, VOCAB + 1)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_read_tp_slice_for_other_layouts(view, tp):
    padded = 8 if tp == 4 else 6                    # the target layout's padded vocabulary
    emb = torch.zeros(padded, full(EMB, "fp32").shape[1])
    emb[:VOCAB] = full(EMB, "fp32")[:VOCAB]         # padding rows are zero whatever the source held
    for r in range(tp):
        assert torch.equal(view.read_tp_slice(EMB, "fp32", r, tp, padded), emb.chunk(tp, dim=0)[r])
        assert torch.equal(view.read_tp_slice(KEYP, "fp32", r, tp), full(KEYP, "fp32").chunk(tp, dim=1)[r])
        assert torch.equal(view.read_tp_slice(LN, "fp32", r, tp), full(LN, "fp32"))


def test_read_tp_slice_refuses_indivisible(view):
    with pytest.raises(ValueError):
        view.read_tp_slice(KEYP, "fp32", 0, 3)
    with pytest.raises(ValueError, match="padded vocabulary"):
        view.read_tp_slice(EMB, "fp32", 0, 2)


def test_flat_sources_point_at_the_bytes(view):
    want = full(EMB, "exp_avg_sq")[:VOCAB].reshape(-1)
    lo, hi = 3, want.numel() - 2
    out = bytearray((hi - lo) * 4)
    for path, offset, nbytes, out_off in view.flat_sources(EMB, "exp_avg_sq", lo, hi):
        with open(path, "rb") as f:
            f.seek(offset)
            out[out_off:out_off + nbytes] = f.read(nbytes)
    assert torch.equal(torch.frombuffer(out, dtype=torch.float32), want[lo:hi])
    assert view.flat_sources(KEYP, "fp32", 0, 4) is None             # dim-1 partitioning: not contiguous
    copies, fills = view.plan_parts(EMB, "fp32")
    assert fills == [] and sum(c[2] for c in copies) == want.numel() * 4


def test_unknown_names_refused(view):
    with pytest.raises(KeyError, match="no parameter named"):
        view.read("nope")
    with pytest.raises(KeyError, match="has no 'momentum'"):
        view.read(LN, "momentum")


def test_open_checkpoint_follows_latest(tmp_path):
    write_step_folder(str(tmp_path / files.step_tag(7)))
    with pytest.raises(FileNotFoundError, match="no `latest`"):
        open_checkpoint(str(tmp_path))
    files.update_latest(str(tmp_path), files.step_tag(7))
    with open_checkpoint(str(tmp_path)) as v:
        assert v.iteration == 7


def test_unknown_kind_refused(tmp_path):
    import json
    step = tmp_path / "global_step1"
    meta = write_step_folder(str(step))
    meta["kind"] = "megatron"
    (step / files.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown checkpoint kind 'megatron'"):
        CheckpointView(str(step))
