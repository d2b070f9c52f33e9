"""Crash-safe publication primitives and the lazy torch-file reader (no training needed)."""

import json
import os

import pytest
import torch

from megatron_tokenformer.checkpointing.format import files, metadata
from megatron_tokenformer.checkpointing.format.tensor_file import TorchFile, materialize


def _step(save, n, meta=True):
    d = os.path.join(save, files.step_tag(n))
    os.makedirs(d)
    if meta:
        with open(os.path.join(d, files.META_FILE), "w") as f:
            json.dump({"format_version": metadata.FORMAT_VERSION, "kind": "deepspeed"}, f)
    return d


def test_publish_latest_and_prune(tmp_path):
    save = str(tmp_path)
    assert files.resolve_step_dir(save) is None                      # nothing saved yet: start from scratch
    for n in (2, 4, 6):
        partial = _step(save, n) + files.PARTIAL_SUFFIX
        os.replace(partial[:-len(files.PARTIAL_SUFFIX)], partial)
        assert files.resolve_step_dir(save) in (None, os.path.join(save, files.step_tag(n - 2)))
        files.publish_step_dir(partial, os.path.join(save, files.step_tag(n)))
        files.update_latest(save, files.step_tag(n))
    assert files.resolve_step_dir(save) == os.path.join(save, "global_step6")
    assert [n for n, _ in files.list_step_dirs(save)] == [2, 4, 6]
    assert files.prune_checkpoints(save, 2) == ["global_step2"]
    assert sorted(os.listdir(save)) == ["global_step4", "global_step6", "latest"]
    # a stale partial folder is never listed and is removed before the next save
    _step(save, 8, meta=False)
    os.replace(os.path.join(save, "global_step8"), os.path.join(save, "global_step8.partial"))
    assert [n for n, _ in files.list_step_dirs(save)] == [4, 6]
    for torn in ("latest.tmp", "latest.tmp-123-abcd1234"):       # an interrupted update of `latest`
        with open(os.path.join(save, torn), "w") as f:
            f.write("glob")
    files.remove_stale_partials(save)
    assert "global_step8.partial" not in os.listdir(save)
    assert not [n for n in os.listdir(save) if n.startswith("latest.tmp")]
    assert files.read_latest(save) == files.step_tag(6)


def test_one_step_listing_complete_or_not(tmp_path):
    """The one listing of step folders: complete ones (training's load and pruning) or every
    ``global_step<N>`` folder (the ownership check of --save), sorted by N, never other names."""
    save = str(tmp_path)
    for n in (10, 2):
        _step(save, n)
    _step(save, 7, meta=False)                                      # another program's folder, or a torn copy
    os.makedirs(os.path.join(save, "global_step3.partial"))
    os.makedirs(os.path.join(save, "global_step04x"))
    with open(os.path.join(save, "global_step5"), "w") as f:      # a file, not a folder
        f.write("x")
    assert files.list_step_dirs(save) == [(2, "global_step2"), (10, "global_step10")]
    assert files.list_step_dirs(save, complete=False) == [(2, "global_step2"), (7, "global_step7"),
                                                          (10, "global_step10")]
    assert [files.step_number(n) for n in ("global_step12", "global_step12.partial", "global_step12.old",
                                           "latest")] == [12, None, None, None]
    assert files.list_step_dirs(os.path.join(save, "missing"), complete=False) == []


def test_resolve_errors(tmp_path):
    save = str(tmp_path)
    _step(save, 3, meta=False)
    files.atomic_write_text(os.path.join(save, "latest"), "global_step3")
    with pytest.raises(ValueError, match="no tokenformer_checkpoint.json"):
        files.resolve_step_dir(save)
    files.atomic_write_text(os.path.join(save, "latest"), "global_step9")
    with pytest.raises(FileNotFoundError, match="names global_step9"):
        files.resolve_step_dir(save)
    with pytest.raises(FileNotFoundError, match="complete iterations"):
        files.resolve_step_dir(save, 5)


def test_republish_same_step_replaces_it(tmp_path):
    save = str(tmp_path)
    first = _step(save, 1)
    with open(os.path.join(first, "a"), "w") as f:
        f.write("old")
    partial = os.path.join(save, "global_step1.partial")
    os.makedirs(partial)
    with open(os.path.join(partial, "a"), "w") as f:
        f.write("new")
    files.publish_step_dir(partial, first)
    assert open(os.path.join(first, "a")).read() == "new" and sorted(os.listdir(save)) == ["global_step1"]


def test_torch_file_reads_like_torch_load(tmp_path):
    path = str(tmp_path / "x.pt")
    base = torch.arange(40, dtype=torch.float32)
    obj = {"a": torch.randn(3, 5).to(torch.bfloat16), "view": base[10:20], "same": base,
           "nested": [torch.tensor(7.0), {"p": torch.nn.Parameter(torch.ones(2, 2))}], "n": 3, "s": "text"}
    torch.save(obj, path)
    ref = torch.load(path, weights_only=False)
    with TorchFile(path) as f:
        got = materialize(f.obj)
        assert f.obj["view"].read_flat(2, 3).tolist() == [12.0, 13.0, 14.0]
        assert f.obj["same"].storage is f.obj["view"].storage        # shared storage read once per key
        with pytest.raises(ValueError, match="outside a tensor"):
            f.obj["view"].read_flat(8, 5)
    for key in ("a", "view", "same"):
        assert torch.equal(got[key], ref[key]) and got[key].dtype == ref[key].dtype
    assert torch.equal(got["nested"][0], ref["nested"][0]) and torch.equal(got["nested"][1]["p"], ref["nested"][1]["p"])
    assert got["n"] == 3 and got["s"] == "text"


def test_torch_file_truncated(tmp_path):
    path = str(tmp_path / "big.pt")
    torch.save({"w": torch.randn(1000)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2000)
    with pytest.raises(ValueError, match="big.pt"):
        f = TorchFile(path)
        f.obj["w"].load()
