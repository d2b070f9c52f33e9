"""The canonical kind: CanonicalWriter's files read back by index_canonical_step / CheckpointView, and
write_parts (byte copies + in-place fills + holes) against the tensor assembled by hand."""

import os

import pytest
import torch

from megatron_tokenformer.checkpointing.format import canonical, files, metadata
from megatron_tokenformer.checkpointing.format.entries import CheckpointFormatError, ParamEntry
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from tests.helpers.deepspeed_layout import write_step_folder


def _canonical_step(step_dir, tensors, state_keys=("exp_avg",)):
    """Write {name: {key: tensor}} as a canonical folder; returns the entries."""
    src_meta = write_step_folder(os.path.join(os.path.dirname(step_dir), "unused"))  # a valid config
    w = canonical.CanonicalWriter(step_dir, fsync=False)
    entries = []
    for name, per_key in tensors.items():
        for key, t in per_key.items():
            w.write(name, key, t)
        entries.append(ParamEntry(name, tuple(per_key["fp32"].shape), "float32", 0, False, 3.0))
    meta = dict(src_meta, kind=metadata.KIND_CANONICAL, params=[e.to_dict() for e in entries],
                optimizer_state_keys=list(state_keys), training_state={"iteration": 3, "consumed_samples": 12})
    w.finish(meta)
    return entries, w


def test_tensor_file_path():
    assert canonical.tensor_file("s", "layers.0.x", "exp_avg") == os.path.join("s", "canonical", "layers.0.x",
                                                                               "exp_avg.pt")


def test_written_tensors_read_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"p{i}": {"fp32": torch.randn(4, 3, generator=g), "exp_avg": torch.randn(4, 3, generator=g)}
               for i in range(2)}
    step = str(tmp_path / "global_step3")
    _, w = _canonical_step(step, tensors)
    assert w.bytes_written == 4 * 4 * 3 * 4
    for name, per_key in tensors.items():              # plain torch.load reads the files too
        assert torch.equal(torch.load(canonical.tensor_file(step, name, "fp32")), per_key["fp32"])
    with CheckpointView(step) as view:
        assert view.kind == "canonical" and view.iteration == 3 and view.keys == ["fp32", "exp_avg"]
        assert view.params["p1"].step == 3.0
        for name, per_key in tensors.items():
            for key, t in per_key.items():
                assert torch.equal(view.read(name, key), t)


def test_missing_tensor_file_named(tmp_path):
    step = str(tmp_path / "global_step3")
    _canonical_step(step, {"p0": {"fp32": torch.ones(2, 2), "exp_avg": torch.zeros(2, 2)}})
    os.remove(canonical.tensor_file(step, "p0", "exp_avg"))
    with pytest.raises(CheckpointFormatError, match="exp_avg.pt"):
        CheckpointView(step)


def test_wrong_shape_refused(tmp_path):
    step = str(tmp_path / "global_step3")
    _canonical_step(step, {"p0": {"fp32": torch.ones(2, 2), "exp_avg": torch.zeros(2, 2)}})
    torch.save(torch.ones(3), canonical.tensor_file(step, "p0", "fp32"))
    with pytest.raises(CheckpointFormatError, match=r"expected a tensor of shape \(2, 2\)"):
        CheckpointView(step, verify=False)  # the indexer's own check (the checksums catch the replaced file first)
    with pytest.raises(CheckpointFormatError, match=r"fp32.pt has \d+ bytes; \d+ were written"):
        CheckpointView(step)


def test_no_parameter_list_refused(tmp_path):
    step = str(tmp_path / "global_step3")
    meta = write_step_folder(str(tmp_path / "unused"))
    os.makedirs(step)
    metadata.write_json(os.path.join(step, files.META_FILE), dict(meta, kind="canonical"))
    with pytest.raises(CheckpointFormatError, match="no parameter list"):
        CheckpointView(step)


def test_write_parts_copies_fills_and_holes(tmp_path):
    src = torch.arange(10, dtype=torch.float32) + 1
    src_path = str(tmp_path / "src.bin")
    with open(src_path, "wb") as f:
        f.write(b"xyz" + src.numpy().tobytes())                 # 3 bytes of header before the data
    fill = torch.tensor([-1.0, -2.0])
    w = canonical.CanonicalWriter(str(tmp_path / "step"), fsync=True)
    # elements 0..3 from source elements 2..5, elements 8..9 filled, elements 4..7 and 10..11 stay zero
    w.write_parts("p", "fp32", (3, 4), [(src_path, 3 + 2 * 4, 4 * 4, 0)], [(8, fill)])
    want = torch.zeros(12)
    want[0:4] = src[2:6]
    want[8:10] = fill
    assert torch.equal(torch.load(canonical.tensor_file(str(tmp_path / "step"), "p", "fp32")), want.view(3, 4))
    assert w.bytes_written == 12 * 4
