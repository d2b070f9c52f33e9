"""Which rows --train-only-new-param-tokens keeps frozen (training/param_token_freezing.py), from the
files a checkpoint folder holds: the expansion report of a growth and the arguments a run saved. The
multi-process check that the rows really stay bitwise unchanged is
tests/integration/checkpointing/test_train_only_new_param_tokens.py."""

import json

import pytest

from megatron_tokenformer.checkpointing.format import files, metadata
from megatron_tokenformer.training.param_token_freezing import (
    ARG_KEY,
    FreezingError,
    FreezingOptions,
    _local_old_rows,
    resolve_frozen_counts,
)

GROWN = {"qkv_num_param_tokens": 64, "proj_num_param_tokens": 64, "ffn_num_param_tokens": 256}


def step_dir(tmp_path, growth=None, record=None):
    d = tmp_path / "global_step10"
    d.mkdir()
    (d / files.META_FILE).write_text(json.dumps({"format_version": metadata.FORMAT_VERSION,
                                                 "args": {ARG_KEY: record} if record else {}}))
    if growth is not None:
        (d / files.REPORT_FILE).write_text(json.dumps({"growth": {"token_counts": growth}}))
    return str(d)


def args_for(path, flag):
    return FreezingOptions(train_only_new_param_tokens=flag, load="ckpt", model_type="tokenformer", **GROWN)


def _resolve(path, flag):
    return resolve_frozen_counts(args_for(path, flag), path)


X4 = {"qkv_num_param_tokens": {"old": 16, "new": 64}, "proj_num_param_tokens": {"old": 16, "new": 64},
      "ffn_num_param_tokens": {"old": 64, "new": 256}}
OLD = {"qkv_num_param_tokens": 16, "proj_num_param_tokens": 16, "ffn_num_param_tokens": 64}


def test_the_flag_takes_the_last_growths_old_counts(tmp_path):
    assert _resolve(step_dir(tmp_path, growth=X4), True) == OLD


def test_a_kind_the_growth_left_alone_is_all_old(tmp_path):
    growth = {"ffn_num_param_tokens": {"old": 64, "new": 256}}
    assert _resolve(step_dir(tmp_path, growth=growth), True) == {
        "qkv_num_param_tokens": 64, "proj_num_param_tokens": 64, "ffn_num_param_tokens": 64}


def test_a_grown_checkpoint_without_the_flag_trains_everything(tmp_path):
    assert _resolve(step_dir(tmp_path, growth=X4), None) is None


def test_a_resume_keeps_the_record_without_the_flag(tmp_path):
    assert _resolve(step_dir(tmp_path, record=OLD), None) == OLD


def test_a_new_growth_of_a_frozen_run_starts_over(tmp_path):
    path = step_dir(tmp_path, growth=X4, record={"qkv_num_param_tokens": 8, "proj_num_param_tokens": 8,
                                                  "ffn_num_param_tokens": 32})
    assert _resolve(path, None) is None
    assert _resolve(path, True) == OLD


def test_no_flag_form_trains_everything(tmp_path):
    assert _resolve(step_dir(tmp_path, record=OLD), False) is None


def test_the_flag_without_a_growth_is_one_clear_error(tmp_path):
    with pytest.raises(FreezingError, match="--train-only-new-param-tokens needs a checkpoint grown by"):
        _resolve(step_dir(tmp_path), True)


def test_old_rows_of_each_tensor_rank():
    # 16 old of 64 rows over 2 ranks of 32: rank 0 holds 16 old rows, rank 1 none; over 4 ranks of 16: rank 0 all
    assert [_local_old_rows(16, 64, r, 2) for r in range(2)] == [16, 0]
    assert [_local_old_rows(16, 64, r, 4) for r in range(4)] == [16, 0, 0, 0]
    assert [_local_old_rows(40, 64, r, 4) for r in range(4)] == [16, 16, 8, 0]
