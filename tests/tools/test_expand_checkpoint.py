"""tools/expand_checkpoint.py: plan, output folder rules, report, and every refusal (nothing written).

The source is a real checkpoint written by a short 1-rank pretrain_tokenformer.py run.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "expand_checkpoint.py")

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("expand_checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    work = tmp_path_factory.mktemp("expand_tool")
    save = str(work / "src")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_tokenformer.py"), "--num-layers", "2", "--hidden-size", "32",
           "--num-attention-heads", "4", "--seq-length", "16", "--qkv-num-param-tokens", "16",
           "--proj-num-param-tokens", "16", "--ffn-num-param-tokens", "32", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3", "--mock-data", "--vocab-size", "100",
           "--eval-iters", "0", "--save", save]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(work), save


def _run(tool, capsys, *argv):
    code = tool.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _tree(path):
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = os.path.getsize(p)
    return out


def test_dry_run_prints_plan_and_writes_nothing(tool, source, capsys):
    work, src = source
    dst = os.path.join(work, "dry")
    before = _tree(src)
    code, out, err = _run(tool, capsys, "--load", src, "--save", dst, "--dry-run", "--ffn-num-param-tokens", "64",
                          "--target-tensor-model-parallel-size", "2")
    assert code == 0, err
    assert not os.path.exists(dst) and _tree(src) == before
    line = [l for l in out.splitlines() if l.strip().startswith("layers.1.mlp.key_param_tokens [exp_avg]")]
    assert line and "[32, 32] -> [64, 32]" in line[0] and "8192 bytes" in line[0]
    # every tensor is listed: 23 parameters x (fp32, exp_avg, exp_avg_sq)
    assert sum(1 for l in out.splitlines() if l.startswith("  ") and " -> " in l) == 23 * 3


def test_reshard_and_report(tool, source, capsys):
    work, src = source
    dst = os.path.join(work, "tp2")
    os.makedirs(dst)  # an existing EMPTY folder is fine
    code, out, err = _run(tool, capsys, "--load", src, "--save", dst, "--target-tensor-model-parallel-size", "2",
                          "--target-data-parallel-size", "4")
    assert code == 0, err
    assert open(os.path.join(dst, "latest")).read().strip() == "global_step2"
    report = json.load(open(os.path.join(dst, "global_step2", "expansion_report.json")))
    assert report["source"]["iteration"] == 2 and report["target"]["iteration"] == 2
    assert report["target"]["layout"]["tensor_model_parallel_size"] == 2
    assert report["target"]["layout"]["data_parallel_size"] == 4
    assert report["target"]["consumed_samples"] == 8
    assert report["growth"]["token_counts"] == {} and report["peak_rss_bytes"] > 0
    meta = json.load(open(os.path.join(dst, "global_step2", "tokenformer_checkpoint.json")))
    assert meta["kind"] == "canonical" and meta["training_state"]["lr_scheduler"]["num_steps"] == 2
    assert [n for n in os.listdir(work) if ".partial" in n or ".old-" in n] == []


def test_refuses_non_empty_target_unless_overwrite(tool, source, capsys):
    work, src = source
    dst = os.path.join(work, "busy")
    os.makedirs(dst)
    with open(os.path.join(dst, "keep.txt"), "w") as f:
        f.write("x")
    code, _, err = _run(tool, capsys, "--load", src, "--save", dst)
    assert code == 2 and "--overwrite" in err and "not empty" in err
    assert os.listdir(dst) == ["keep.txt"]
    code, _, err = _run(tool, capsys, "--load", src, "--save", dst, "--overwrite", "--reset-iteration")
    assert code == 0, err
    assert sorted(os.listdir(dst)) == ["global_step0", "latest"]
    meta = json.load(open(os.path.join(dst, "global_step0", "tokenformer_checkpoint.json")))
    assert meta["iteration"] == 0 and meta["consumed_samples"] == 0
    assert meta["training_state"]["lr_scheduler"]["num_steps"] == 0


def _assert_refused(tool, capsys, work, argv, *needles):
    dst = os.path.join(work, "refused")
    before = set(os.listdir(work))
    code, _, err = _run(tool, capsys, *argv, "--save", dst)
    assert code == 2, err
    assert err.startswith("expand_checkpoint.py: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not os.path.exists(dst) and set(os.listdir(work)) == before


def test_growth_refusals(tool, source, capsys):
    work, src = source
    _assert_refused(tool, capsys, work, ["--load", src, "--qkv-num-param-tokens", "18",
                                         "--target-tensor-model-parallel-size", "4"],
                    "--target-tensor-model-parallel-size 4", "qkv_num_param_tokens (18) is not divisible")
    _assert_refused(tool, capsys, work, ["--load", src, "--ffn-num-param-tokens", "16"], "--ffn-num-param-tokens 16",
                    "only be added")
    _assert_refused(tool, capsys, work, ["--load", src, "--num-layers", "1"], "--num-layers 1")
    _assert_refused(tool, capsys, work, ["--load", src, "--num-layers", "4", "--new-layer-positions", "0,9"],
                    "--new-layer-positions")
    _assert_refused(tool, capsys, work, ["--load", src, "--param-token-growth-factor", "1.5",
                                         "--ffn-num-param-tokens", "64"], "--param-token-growth-factor")
    _assert_refused(tool, capsys, work, ["--load", src, "--iteration", "7"], "global_step7", "complete iterations")
    _assert_refused(tool, capsys, work, ["--load", os.path.join(work, "nowhere")], "nowhere")


def test_refuses_softmax_token_growth(tool, source, capsys):
    work, src = source
    soft = os.path.join(work, "softmax_src")
    shutil.copytree(src, soft)
    meta_path = os.path.join(soft, "global_step2", "tokenformer_checkpoint.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["pattention_normalization"] = "softmax"
    json.dump(meta, open(meta_path, "w"))
    from tests.helpers.tamper import record_checksums
    record_checksums(os.path.dirname(meta_path))  # a consistent softmax checkpoint
    _assert_refused(tool, capsys, work, ["--load", soft, "--param-token-growth-factor", "2"], "softmax")
    # depth growth stays exact for softmax (new blocks output zero whatever the normalisation)
    code, _, err = _run(tool, capsys, "--load", soft, "--save", os.path.join(work, "softmax_deeper"),
                        "--num-layers", "3")
    assert code == 0, err


def test_refuses_missing_shard_and_inconsistent_shapes(tool, source, capsys):
    work, src = source
    broken = os.path.join(work, "missing_shard")
    shutil.copytree(src, broken)
    os.remove(os.path.join(broken, "global_step2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    _assert_refused(tool, capsys, work, ["--load", broken], "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    bad = os.path.join(work, "bad_shapes")
    shutil.copytree(src, bad)
    path = os.path.join(bad, "global_step2", "mp_rank_00_model_states.pt")
    sd = torch.load(path, weights_only=False)
    entry = next(p for p in sd["tokenformer"]["params"] if p["name"] == "layers.0.mlp.value_param_tokens")
    entry["shape"] = [40, 32]
    torch.save(sd, path)
    from tests.helpers.tamper import record_checksums
    record_checksums(os.path.dirname(path))  # consistent files, inconsistent shapes: the indexer's check
    _assert_refused(tool, capsys, work, ["--load", bad], "layers.0.mlp.value_param_tokens", "shape")


def test_refuses_to_write_into_source(tool, source, capsys):
    work, src = source
    before = _tree(src)
    code, _, err = _run(tool, capsys, "--load", src, "--save", os.path.join(src, "inside"))
    assert code == 2 and "overlaps the source" in err
    assert _tree(src) == before


def test_cli_exit_code(source):
    work, src = source
    proc = subprocess.run([sys.executable, TOOL, "--load", src, "--save", os.path.join(work, "cli"),
                           "--num-layers", "1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "expand_checkpoint.py: error: --num-layers 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bf16_checkpoint(tool, source, capsys):
    """A bf16 run's ZeRO shards (bf16_zero_pp_rank_*): the fp32 masters are read, and the bf16 weights
    DeepSpeed saved are exactly those masters rounded to bf16; growth works on them."""
    work, _ = source
    save = os.path.join(work, "bf16_src")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_tokenformer.py"), "--num-layers", "2", "--hidden-size", "32",
           "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
           "--train-iters", "2", "--lr", "1e-3", "--mock-data", "--vocab-size", "100", "--eval-iters", "0", "--bf16",
           "--save", save]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = os.path.join(save, "global_step2")
    assert os.path.isfile(os.path.join(step, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    from megatron_tokenformer.checkpointing.format.view import CheckpointView
    module = torch.load(os.path.join(step, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    with CheckpointView(step) as view:
        assert view.params["layers.0.mlp.key_param_tokens"].dtype == "bfloat16"
        for name, entry in view.params.items():
            saved = module[name][:entry.shape[0]] if entry.vocab else module[name]
            assert saved.dtype == torch.bfloat16
            assert torch.equal(view.read(name).to(torch.bfloat16), saved), name
    dst = os.path.join(work, "bf16_grown")
    code, _, err = _run(tool, capsys, "--load", save, "--save", dst, "--ffn-num-param-tokens", "256")
    assert code == 0, err
    with CheckpointView(os.path.join(dst, "global_step2")) as grown:
        assert grown.params["layers.1.mlp.key_param_tokens"].shape == (256, 32)
        assert grown.params["layers.1.mlp.key_param_tokens"].dtype == "bfloat16"


def test_refuses_any_overlap_with_overwrite_too(tool, source, capsys):
    """Issue 20 item 1: --overwrite never lets --save be the source, a parent of it, or it through a symlink."""
    work, src = source
    before = _tree(src)
    link = os.path.join(work, "src_link")
    os.symlink(src, link)
    try:
        for save in (src, work, link):
            code, _, err = _run(tool, capsys, "--load", src, "--save", save, "--overwrite")
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and "overlaps the source --load" in lines[0], err
            assert _tree(src) == before
    finally:
        os.remove(link)


# A stand-in for a training run holding --save: an flock on its lock file with the holder record
# (plain Python: the record format of save_dir.holder_info, written independently of it).
HOLD = ("import fcntl, json, os, socket, sys, time; fd = os.open(os.path.join(sys.argv[1], 'tokenformer_save.lock'), "
        "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'host': "
        "socket.gethostname(), 'pid': os.getpid(), 'slurm_job_id': '31'}).encode()); print('held', flush=True); "
        "time.sleep(600)")


def test_takes_the_save_lock_of_training(tool, source, capsys, monkeypatch):
    """Issue 20 item 6: a --save held by another writer (a training run, another expand_checkpoint.py) is
    refused naming the holder, with --overwrite too (before: two runs into one --save both reported
    success and one result silently replaced the other)."""
    import signal
    import socket

    from megatron_tokenformer.checkpointing import expand
    work, src = source
    dst = os.path.join(work, "locked")
    os.makedirs(dst)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, dst], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = _run(tool, capsys, "--load", src, "--save", dst, "--overwrite")
        assert code == 2 and err.count("\n") == 1, err
        assert err == (f"expand_checkpoint.py: error: --save {dst} is in use by another run (host "
                       f"{socket.gethostname()}, pid {holder.pid}, Slurm job 31); wait for it to end or choose "
                       "another --save\n")
        assert os.listdir(dst) == ["tokenformer_save.lock"]           # the holder's file only
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    # a second run starting while the first writes its tensors: refused naming the first (this process)
    second = {}
    real_write = expand._write_tensors

    def write_and_start_a_second_run(source_, writer):
        second["result"] = _run(tool, capsys, "--load", src, "--save", dst, "--num-layers", "4", "--overwrite")
        return real_write(source_, writer)
    monkeypatch.setattr(expand, "_write_tensors", write_and_start_a_second_run)
    code, _, err = _run(tool, capsys, "--load", src, "--save", dst, "--num-layers", "3")
    assert code == 0, err
    code2, _, err2 = second["result"]
    assert code2 == 2 and f"--save {dst} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}" \
        in err2, err2
    meta = json.load(open(os.path.join(dst, "global_step2", "tokenformer_checkpoint.json")))
    assert meta["model_config"]["num_layers"] == 3                      # the first run's result, intact
    assert sorted(os.listdir(dst)) == ["global_step2", "latest", "tokenformer_save.lock"]   # the holder's old file
    assert [n for n in os.listdir(work) if ".partial" in n or ".old-" in n] == []


def test_full_disk_is_one_line_and_leaves_nothing(tool, source, capsys, tmp_path):
    """Issue 20 item 8: ENOSPC while writing printed a traceback; now one line naming the file, and the
    --save this run created is gone again."""
    from tests.helpers.small_fs import small_tmpfs
    work, src = source
    with small_tmpfs(tmp_path / "mnt", "64k") as mnt:
        dst = os.path.join(mnt, "grown")
        code, _, err = _run(tool, capsys, "--load", src, "--save", dst, "--param-token-growth-factor", "2")
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"expand_checkpoint.py: error: writing --save {dst} failed: ENOSPC "
                              "(No space left on device) writing "), err
        assert "nothing was written" in err and os.listdir(mnt) == []
