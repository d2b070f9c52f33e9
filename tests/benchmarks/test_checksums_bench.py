"""benchmarks/checksums.py still drives the code it measures (a rename in checkpointing/io.py once broke it
unnoticed): its save timing on a tiny state dict, without and with checksums, against the files' own bytes."""

import os

import torch

from megatron_tokenformer.checkpointing.format import checksums
from tests.helpers.paths import load_benchmark


def test_save_timing_writes_the_files_and_with_checksums_their_manifest(tmp_path):
    bench = load_benchmark("checksums")
    states = {"a.pt": {"w": torch.arange(12.0)}, "b.pt": {"v": torch.ones(3)}}
    bench.time_save(states, str(tmp_path / "plain"), False)
    assert sorted(os.listdir(tmp_path / "plain")) == ["a.pt", "b.pt"]
    bench.time_save(states, str(tmp_path / "summed"), True)
    manifest = checksums.read_manifest(str(tmp_path / "summed"), checksums.manifest_name(0))
    for name in states:
        assert manifest[name] == checksums.hash_file(str(tmp_path / "summed" / name)), name
        assert torch.equal(torch.load(tmp_path / "summed" / name)[next(iter(states[name]))],
                           next(iter(states[name].values())))
