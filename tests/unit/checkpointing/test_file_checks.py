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
