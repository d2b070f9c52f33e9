"""tensor_parallel and model import each other's submodules: both import orders must work."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("first", ["megatron_tokenformer.tensor_parallel.pattention",
                                   "megatron_tokenformer.tensor_parallel",
                                   "megatron_tokenformer.model.language_model"])
def test_fresh_interpreter_import(first):
    code = (f"import {first}\n"
            "from megatron_tokenformer.model import TokenformerLM, Pattention\n"
            "from megatron_tokenformer.tensor_parallel import ParallelPattention\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
