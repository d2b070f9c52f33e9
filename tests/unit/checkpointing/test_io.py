"""checkpointing/io.py's guard around DeepSpeed's writes: a failed write does not raise out of DeepSpeed's
save_checkpoint (whose collectives every rank must reach); it is recorded, its half-written file removed,
the rank's later writes skipped, and the engine's own methods restored afterwards.

A stand-in engine follows DeepSpeed 0.19's order (rank 0 makedirs, barrier, model file, ZeRO file,
recovery scripts, barrier) and records which steps it got through."""

import errno
import os

import pytest

from megatron_tokenformer.checkpointing import io as checkpoint_io


class StandInCheckpointEngine:
    def __init__(self, fail_on=None):
        self.fail_on = fail_on
        self.written = []

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
            if self.fail_on and self.fail_on in os.path.basename(path):
                raise OSError(errno.ENOSPC, "No space left on device", path)   # after a partial write
        self.written.append(os.path.basename(path))


class StandInEngine:
    def __init__(self, folder, fail_on=None):
        self.folder = folder
        self.checkpoint_engine = StandInCheckpointEngine(fail_on)
        self.steps = []

    def _copy_recovery_script(self, save_path):
        with open(os.path.join(save_path, "zero_to_fp32.py"), "w") as f:
            f.write("#")

    def save_checkpoint(self):
        self.checkpoint_engine.makedirs(self.folder, exist_ok=True)
        self.steps.append("barrier")
        self.checkpoint_engine.save({}, os.path.join(self.folder, "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({}, os.path.join(self.folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        self._copy_recovery_script(self.folder)
        self.steps.append("barrier")


@pytest.mark.parametrize("fail_on, written", [
    (None, ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]),
    ("mp_rank_00_model", []),
    ("zero_pp_rank_0", ["mp_rank_00_model_states.pt"]),
])
def test_a_failed_write_is_recorded_and_every_collective_still_reached(tmp_path, fail_on, written):
    folder = str(tmp_path / "global_step4.partial")
    engine = StandInEngine(folder, fail_on)
    with checkpoint_io._guarded_deepspeed_writes(engine) as writes:
        engine.save_checkpoint()                                        # never raises
    assert engine.steps == ["barrier", "barrier"]                       # both collectives reached
    assert engine.checkpoint_engine.written == written
    on_disk = sorted(os.listdir(folder))
    if fail_on is None:
        assert writes.error is None
        assert on_disk == sorted(written + ["zero_to_fp32.py"])
    else:
        assert isinstance(writes.error, OSError) and writes.error.errno == errno.ENOSPC
        assert on_disk == sorted(written)                               # half-written file gone, later writes skipped
    # the engine's own methods are back
    assert "save" not in vars(engine.checkpoint_engine) and "makedirs" not in vars(engine.checkpoint_engine)
    assert "_copy_recovery_script" not in vars(engine)
    engine.checkpoint_engine.fail_on = None
    engine.checkpoint_engine.save({}, os.path.join(folder, "after.pt"))
    assert engine.checkpoint_engine.written[-1] == "after.pt"
