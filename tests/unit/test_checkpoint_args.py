"""checkpoint_args.check_resume_inputs: the tokenizer compared by content (refused unless
--override-checkpoint-tokenizer), a changed --data-path said in one line, a changed --split on the same
data refused unless --override-checkpoint-split. (apply_checkpoint_args: integration/checkpointing.)"""

import json
import os

import pytest

from megatron_tokenformer.checkpoint_args import (
    CheckpointArgs,
    CheckpointMismatchError,
    ResumeInputs,
    check_resume_inputs,
)
from megatron_tokenformer.checkpointing.format import files, metadata


@pytest.fixture
def step(tmp_path):
    """A step trained on data/a with --split 969,30,1 and the tokenizer tok_a (8 consumed samples)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        for ext in (".bin", ".idx"):
            (data / (name + ext)).write_bytes(b"x")
    (tmp_path / "tok_a.model").write_bytes(b"tokenizer A" * 10)
    (tmp_path / "tok_b.model").write_bytes(b"tokenizer B" * 10)       # same size, other content
    d = tmp_path / "ckpt" / "global_step2"
    d.mkdir(parents=True)
    (d / files.TOKENIZER_FILE).write_bytes((tmp_path / "tok_a.model").read_bytes())
    meta = {"format_version": metadata.FORMAT_VERSION, "iteration": 2, "consumed_samples": 8,
            "args": {"data_path": [str(data / "a")], "split": "969,30,1"},
            "tokenizer": {"file": files.TOKENIZER_FILE, "source": str(tmp_path / "tok_a.model")}}
    (d / metadata.META_FILE).write_text(json.dumps(meta))
    return tmp_path, CheckpointArgs(str(d), {})


def _args(tmp_path, **kw):
    a = dict(tokenizer_model=str(tmp_path / "tok_a.model"), tokenizer_type="SentencePieceTokenizer",
             data_path=[str(tmp_path / "data" / "a")], split="969,30,1", finetune=False,
             override_checkpoint_tokenizer=False, override_checkpoint_split=False, vocab_file=None)
    a.update(kw)
    return ResumeInputs(**a)


def test_same_inputs_say_nothing(step, monkeypatch):
    tmp_path, ckpt = step
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "copy_of_a.model"                                 # another path, the same content
    copy.write_bytes((tmp_path / "tok_a.model").read_bytes())
    os.symlink(tmp_path / "data", tmp_path / "data_link")
    for args in (_args(tmp_path), _args(tmp_path, tokenizer_model=str(copy)),
                 _args(tmp_path, data_path=["data/a"], split="969, 30, 1"),           # relative, spaced
                 _args(tmp_path, data_path=[str(tmp_path / "data_link" / "a")], split="96.9,3,0.1")):
        assert check_resume_inputs(args, ckpt) == []
    assert check_resume_inputs(_args(tmp_path), None) == []


def test_another_tokenizer_of_the_same_size_is_refused(step):
    tmp_path, ckpt = step
    with pytest.raises(CheckpointMismatchError) as info:
        check_resume_inputs(_args(tmp_path, tokenizer_model=str(tmp_path / "tok_b.model")), ckpt)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"the tokenizer {tmp_path / 'tok_b.model'} differs from the one "
                                              f"{ckpt.step_dir} was trained with")
    assert "--override-checkpoint-tokenizer" in msg
    for finetune in (False, True):                                      # --finetune too: ids index the embedding
        with pytest.raises(CheckpointMismatchError):
            check_resume_inputs(_args(tmp_path, tokenizer_model=str(tmp_path / "tok_b.model"), finetune=finetune),
                                ckpt)
    notes = check_resume_inputs(_args(tmp_path, tokenizer_model=str(tmp_path / "tok_b.model"),
                                      override_checkpoint_tokenizer=True), ckpt)
    assert len(notes) == 1 and notes[0].startswith("note: --override-checkpoint-tokenizer: ")
    notes = check_resume_inputs(_args(tmp_path, tokenizer_model=None, tokenizer_type="NullTokenizer"), ckpt)
    assert len(notes) == 1 and "this run uses none (NullTokenizer)" in notes[0]


def test_another_data_path_is_one_note(step):
    tmp_path, ckpt = step
    b = str(tmp_path / "data" / "b")
    for data_path in ([b], ["0.5", str(tmp_path / "data" / "a"), "0.5", b]):
        notes = check_resume_inputs(_args(tmp_path, data_path=data_path, split="1,0,0"), ckpt)   # split: no matter
        assert len(notes) == 1 and "\n" not in notes[0]
        assert notes[0].startswith(f"note: --data-path {' '.join(data_path)} is not the data {ckpt.step_dir} was "
                                   f"trained on ({tmp_path / 'data' / 'a'}): its 8 consumed samples")
    assert check_resume_inputs(_args(tmp_path, data_path=[b], finetune=True), ckpt) == []   # a new run: no note


def test_another_split_of_the_same_data_is_refused(step):
    tmp_path, ckpt = step
    with pytest.raises(CheckpointMismatchError) as info:
        check_resume_inputs(_args(tmp_path, split="98,1,1"), ckpt)
    msg = str(info.value)
    assert msg.startswith(f"--split 98,1,1 differs from the split {ckpt.step_dir} was trained with (969,30,1) on the "
                          "same --data-path") and "--override-checkpoint-split" in msg
    notes = check_resume_inputs(_args(tmp_path, split="98,1,1", override_checkpoint_split=True), ckpt)
    assert len(notes) == 1 and notes[0].startswith("note: --override-checkpoint-split: ")
    assert check_resume_inputs(_args(tmp_path, split="98,1,1", finetune=True), ckpt) == []


def test_nothing_consumed_means_nothing_to_carry(step):
    tmp_path, ckpt = step
    meta_path = os.path.join(ckpt.step_dir, metadata.META_FILE)
    meta = json.load(open(meta_path))
    meta["consumed_samples"] = 0                                        # e.g. expand_checkpoint --reset-iteration
    json.dump(meta, open(meta_path, "w"))
    assert check_resume_inputs(_args(tmp_path, split="98,1,1"), ckpt) == []
