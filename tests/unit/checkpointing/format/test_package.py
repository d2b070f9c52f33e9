"""The format layer does not import DeepSpeed (checked in a fresh interpreter)."""

import subprocess
import sys

from tests.helpers.paths import REPO_ROOT


def test_format_imports_without_deepspeed():
    code = ("import sys, pkgutil, importlib, megatron_tokenformer.checkpointing.format as f\n"
            "for m in pkgutil.iter_modules(f.__path__):\n"
            "    importlib.import_module(f.__name__ + '.' + m.name)\n"
            "import megatron_tokenformer.checkpoint_args\n"
            "assert 'deepspeed' not in sys.modules, sorted(k for k in sys.modules if 'deepspeed' in k)[:5]\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
