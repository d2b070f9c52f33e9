"""checkpointing/file_checks.py: truncated or unreadable checkpoint files are named with their path."""


import torch

from megatron_tokenformer.checkpointing import file_checks


def test_complete_truncated_empty_and_bad_json(tmp_path):
    good = str(tmp_path / "model.pt")
    torch.save({"w": torch.arange(5000.0)}, good)
    assert file_checks.check_file(good) is None
    truncated = str(tmp_path / "cut.pt")
    data = open(good, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    msg = file_checks.check_file(truncated)
    assert msg.startswith(truncated + " is truncated")
    empty = str(tmp_path / "empty.pt")
    open(empty, "wb").close()
    assert file_checks.check_file(empty) == f"{empty} is empty (an interrupted write?)"
    bad = str(tmp_path / "meta.json")
    open(bad, "w").write('{"a": ')
    assert file_checks.check_file(bad).startswith(bad + " cannot be read")


def test_verify_step_files_single_process(tmp_path):
    step = tmp_path / "global_step2"
    step.mkdir()
    torch.save({"x": 1}, str(step / "a.pt"))
    file_checks.verify_step_files(str(step))
    (step / "b.pt").write_bytes(b"PK\x03\x04 not really")
    try:
        file_checks.verify_step_files(str(step))
        raise AssertionError("not detected")
    except file_checks.CheckpointFileError as exc:
        assert str(exc).startswith(f"checkpoint file {step / 'b.pt'} is truncated") and "(found by rank 0)" in str(exc)


def _canonical_step(tmp_path, fsync=False):
    """A canonical step folder written by CanonicalWriter (checksums recorded as it writes), plus a
    tokenizer file added by the caller before finish (as expand/import do)."""
    from megatron_tokenformer.checkpointing.format import canonical, metadata
    step = tmp_path / "ckpt" / "global_step3"
    w = canonical.CanonicalWriter(str(step), fsync=fsync)
    w.write("p0", "fp32", torch.arange(4096.0).view(64, 64))
    w.write_parts("p1", "fp32", (8, 8), [], [(0, torch.ones(16))])   # kernel copies / fills: hashed after
    (step / "tokenizer.model").write_bytes(b"tok" * 100)
    w.finish({"kind": metadata.KIND_CANONICAL, "params": []})
    return step


def test_checksums_recorded_while_writing_match_the_files(tmp_path):
    from megatron_tokenformer.checkpointing.format import checksums
    step = _canonical_step(tmp_path)
    expected = checksums.expected_checksums(str(step), None)
    assert sorted(expected) == ["canonical/p0/fp32.pt", "canonical/p1/fp32.pt", "tokenformer_checkpoint.json",
                                "tokenizer.model"]
    import xxhash
    for rel, (size, digest) in expected.items():   # the reference: the whole file hashed independently
        data = (step / rel).read_bytes()
        assert (size, digest) == (len(data), xxhash.xxh3_64(data).hexdigest()), rel
    file_checks.verify_step(str(step))
    assert file_checks.verify_folder(str(tmp_path / "ckpt"), log=lambda _: None) == []


def test_flipped_byte_missing_manifest_and_damaged_manifest_named(tmp_path):
    from tests.helpers.tamper import flip_tensor_byte
    step = _canonical_step(tmp_path)
    victim = step / "canonical" / "p0" / "fp32.pt"
    flip_tensor_byte(str(victim))
    assert file_checks.check_file(str(victim)) is None          # structure and globals still fine
    try:
        file_checks.verify_step(str(step))
        raise AssertionError("not detected")
    except file_checks.CheckpointFileError as exc:
        assert str(exc).startswith(f"checkpoint file {victim} is corrupt: its xxh3_64 checksum is "), exc
    lines = []
    assert len(file_checks.verify_folder(str(tmp_path / "ckpt"), log=lines.append)) == 1
    assert lines[0].startswith(f"{step}: BAD: checkpoint file {victim} is corrupt")
    manifest = step / "tokenformer_checksums_rank_00000.json"
    manifest.write_text(manifest.read_text().replace('"tokenizer.model": [\n   300', '"tokenizer.model": [\n   301'))
    msg = file_checks.check_step(str(step))[1]
    assert msg == f"checksum manifest {manifest} is damaged (its own digest does not match)", msg
    manifest.unlink()
    msg = file_checks.check_step(str(step))[1]
    assert msg == f"checksum manifest {manifest} is missing (the metadata lists it)", msg


def test_step_without_checksums_still_verifies(tmp_path):
    """A step written before checksums existed (no manifest, no metadata entry): structure and globals only."""
    step = tmp_path / "old" / "global_step1"
    step.mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, str(step / "mp_rank_00_model_states.pt"))
    (step / "tokenformer_checkpoint.json").write_text('{"kind": "deepspeed"}')
    lines = []
    assert file_checks.verify_folder(str(tmp_path / "old"), log=lines.append) == []
    assert lines[0].endswith("no checksums recorded: written before they existed)")


def test_payload_ranks_above_checksum_mismatch(tmp_path):
    """A planted payload also changes the file's checksum: the refusal names the global (the attack)."""
    from tests.helpers.tamper import PAYLOAD_GLOBAL, plant_payload
    step = _canonical_step(tmp_path)
    marker = str(tmp_path / "marker")
    victim = step / "canonical" / "p0" / "fp32.pt"
    torch.save({"t": torch.ones(2)}, str(victim))
    plant_payload(str(victim), marker)
    try:
        file_checks.verify_step(str(step))
        raise AssertionError("not detected")
    except file_checks.CheckpointFileError as exc:
        assert str(exc).startswith(f"checkpoint file {victim}: refused: its pickle names {PAYLOAD_GLOBAL},"), exc
    import os
    assert not os.path.exists(marker)
