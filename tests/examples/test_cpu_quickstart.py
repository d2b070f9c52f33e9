"""examples/cpu_quickstart.sh shortened through its knobs (ITERS=2, a 0.5 MB corpus, a 512-token tokenizer), run
as the README runs it (from the repository root; WORK in a temporary folder that already holds a quick-start
checkpoint); then the next-step commands it prints, verbatim, from that same directory (the three at once: they
only read the checkpoint).

Checked against what each command promises: the earlier checkpoint is untouched and the run saved beside it, the
generated text continues the prompt, the grown checkpoint has twice the parameter tokens, the Hugging Face folder
is complete. A CKPT that exists is refused before anything is written.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import zygote
from tests.helpers.train_runs import free_port

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "cpu_quickstart.sh")
SHORT = dict(ITERS="2", CORPUS_MB="0.5", VOCAB="512")


def script_env(**extra):
    """The script's environment; its Python (``$PYTHON``, which the printed commands name too) runs script runs
    forked by this worker's fork server (tests/helpers/zygote.py: shim_env)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORK", "CKPT", "LOG_INTERVAL")}
    env.update(SHORT, MASTER_PORT=str(free_port()), **extra)
    return zygote.shim_env(dict(env, PYTHON=sys.executable))


def next_commands(stdout):
    """The indented, non-comment lines after "Next steps": the commands exactly as printed."""
    block = stdout[stdout.index("Next steps, from this directory:"):].splitlines()[1:]
    lines = []
    for line in block:
        if not line.startswith("  "):
            break
        if not line.strip().startswith("#"):
            lines.append(line.strip())
    return lines


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("user_dir") / "quickstart"
    earlier = work / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "latest").write_text("global_step300")  # an earlier run's checkpoint: never overwritten
    proc = subprocess.run(["bash", "examples/cpu_quickstart.sh"], cwd=ROOT, env=script_env(WORK=str(work)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return work, proc


def test_trains_saves_beside_the_earlier_checkpoint_and_prints_the_next_commands(quickstart):
    work, proc = quickstart
    assert (work / "checkpoints" / "latest").read_text() == "global_step300"
    assert os.listdir(work / "checkpoints") == ["latest"]
    saved = work / "checkpoints-2"
    assert (saved / "latest").read_text().strip() == "global_step2"
    assert f"the trained model is saved in {saved} (global_step2)" in proc.stdout
    assert re.search(r"lm loss [0-9.]+ \(first log line\) -> [0-9.]+ \(last\)", proc.stdout)
    cmds = next_commands(proc.stdout)
    assert [re.search(r"tools/(\w+)\.py", c).group(1) for c in cmds] == ["generate", "expand_checkpoint", "export_hf"]
    python = script_env()["PYTHON"]
    assert all(c.startswith(python + " tools/") for c in cmds), cmds  # as run from the repository root


def test_printed_commands_work_as_printed(quickstart):
    work, proc = quickstart
    cmds = next_commands(proc.stdout)
    env = script_env()
    runs = [subprocess.Popen(["bash", "-c", c], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for c in cmds]
    outs = [p.communicate(timeout=600) for p in runs]
    for c, p, (out, err) in zip(cmds, runs, outs):
        assert p.returncode == 0, (c, out[-2000:], err[-2000:])
    generated = outs[0][0]
    assert generated.startswith("import os") and len(generated.strip()) > len("import os"), generated
    grown_step = work / "checkpoints-2-x2" / "global_step2"
    grown = json.loads((grown_step / "tokenformer_checkpoint.json").read_text())["model_config"]
    assert (grown["qkv_num_param_tokens"], grown["proj_num_param_tokens"], grown["ffn_num_param_tokens"]) == \
        (256, 256, 1024)
    hf = work / "checkpoints-2-hf"
    assert {"config.json", "model.safetensors", "modeling_tokenformer.py", "tokenizer.json",
            "generation_config.json"} <= set(os.listdir(hf))


def test_an_existing_ckpt_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "latest").write_text("global_step9")
    proc = subprocess.run(["bash", SCRIPT], cwd=tmp_path, env=script_env(CKPT="mine"), capture_output=True,
                          text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("cpu_quickstart: CKPT: mine already exists"), \
        proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["mine"] and os.listdir(tmp_path / "mine") == ["latest"]
