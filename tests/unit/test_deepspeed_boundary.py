"""The tested DeepSpeed/torch range and the start-up check (megatron_tokenformer/deepspeed_boundary.py)."""

import ast
import os
import re

from megatron_tokenformer import deepspeed_boundary as boundary
from tests.helpers.paths import REPO_ROOT


def test_parse_version():
    assert boundary.parse_version("2.13.0+cpu") == (2, 13, 0)
    assert boundary.parse_version("0.19.8") == (0, 19, 8)
    assert boundary.parse_version("2.14.0.dev20260101+cu128") == (2, 14, 0)
    assert boundary.parse_version("2.14.0a0+git1234") == (2, 14, 0)
    assert boundary.parse_version("unknown") is None


def test_inside_the_range_says_nothing():
    assert boundary.version_warning("0.19.8", "2.13.0+cpu") is None
    assert boundary.version_warning("0.19.0", "2.13.1+cu128") is None


def test_outside_the_range_is_one_line_naming_both():
    for ds, torch_version in (("0.20.0", "2.13.0"), ("0.18.9", "2.13.0"), ("0.19.8", "2.12.1"),
                              ("0.19.8", "2.14.0.dev20260101"), (None, "2.13.0"), ("0.19.8", "weird")):
        line = boundary.version_warning(ds, torch_version)
        assert line is not None and "\n" not in line, (ds, torch_version)
        assert f"DeepSpeed {ds or 'not installed'}" in line and f"torch {torch_version}" in line
        assert "deepspeed>=0.19,<0.20" in line and "torch>=2.13,<2.14" in line


def test_check_versions_emits_with_injected_lookup():
    seen = []
    installed = {"deepspeed": "0.21.0", "torch": "2.13.0"}
    line = boundary.check_versions(seen.append, installed.get)
    assert seen == [line] and "0.21.0" in line
    seen.clear()
    assert boundary.check_versions(seen.append) is None and seen == []  # this machine: inside the range


def _setup_call():
    with open(os.path.join(REPO_ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")


def test_setup_py_pins_the_tested_range():
    call = _setup_call()
    kw = {k.arg: k.value for k in call.keywords}
    requires = [ast.literal_eval(e) for e in kw["install_requires"].elts]

    def spec(low, high):
        return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
    assert "deepspeed" + spec(*boundary.TESTED_DEEPSPEED) in requires
    assert "torch" + spec(*boundary.TESTED_TORCH) in requires
    assert ast.literal_eval(kw["python_requires"]) == ">=" + ".".join(map(str, boundary.TESTED_PYTHON))


def test_python_floor_agrees_with_the_code():
    """co_qualname exists from Python 3.11; on 3.10 (the floor) the fused kernels' code copies rename co_name only."""
    import types
    from megatron_tokenformer.ops.pattention_norm import _renamed_code
    assert boundary.TESTED_PYTHON == (3, 10)

    def step():
        return 1
    code = _renamed_code(step.__code__, "step_x")
    assert code.co_name == "step_x" and getattr(code, "co_qualname", "step_x") == "step_x"

    class Py310Code:  # what a 3.10 code object offers: replace() without co_qualname
        def replace(self, **kw):
            assert set(kw) == {"co_name"}, kw
            return kw
    assert _renamed_code(Py310Code(), "step_y") == {"co_name": "step_y"}
    assert isinstance(code, types.CodeType)
