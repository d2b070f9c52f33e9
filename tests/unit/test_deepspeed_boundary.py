"""megatron_tokenformer/deepspeed_boundary.py: the tested DeepSpeed/torch range and the start-up check, the
deferred Muon modules, the guard around DeepSpeed's checkpoint writes, ZeRO fragments, the loss scaler, and
the rule that no other module of the package reaches into DeepSpeed's internals."""

import ast
import errno
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

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


# --------------------------------------------------------------------------- DeepSpeed's Muon modules, deferred
# Each check runs in a fresh interpreter (the stand-ins live in sys.modules). Reference: DeepSpeed's real
# modules, loaded by the import system where the check says so.
def run(code):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_isinstance_checks_answer_without_compiling():
    out = run("""
        import sys, torch, deepspeed
        from megatron_tokenformer.deepspeed_boundary import defer_deepspeed_muon_modules, MUON_OPTIMIZER
        assert defer_deepspeed_muon_modules() and defer_deepspeed_muon_modules()  # idempotent
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
        from deepspeed.runtime.zero.muon.original_muon import muon_update
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        assert not isinstance(opt, MuonWithAuxAdam) and callable(muon_update)
        # DeepSpeed's ZeRO support check, with its logging rank query answered
        import deepspeed.runtime.zero.utils as zu
        zu.dist.get_rank = lambda *a, **k: 0
        assert zu.is_zero_supported_optimizer(opt)
        print("inductor loaded:", "torch._inductor.compile_fx" in sys.modules)
    """)
    assert "inductor loaded: False" in out


def test_other_names_load_the_real_module():
    run("""
        import sys, deepspeed
        from megatron_tokenformer.deepspeed_boundary import (DeferredModule, ORIGINAL_MUON,
                                                              defer_deepspeed_muon_modules)
        defer_deepspeed_muon_modules()
        stand_in = sys.modules[ORIGINAL_MUON]
        assert isinstance(stand_in, DeferredModule)
        adam_update = stand_in.adam_update  # not a placeholder: the real module is executed
        real = sys.modules[ORIGINAL_MUON]
        assert not isinstance(real, DeferredModule) and real.adam_update is adam_update
        assert real.__file__.endswith("original_muon.py")
        # the stand-in's muon_update forwards to the real function
        calls = []
        real.muon_update = lambda *a, **k: calls.append((a, k)) or "real"
        assert stand_in.muon_update(1, 2, beta=3) == "real" and calls == [((1, 2), {"beta": 3})]
    """)


def test_nothing_installed_over_real_modules():
    run("""
        import sys, deepspeed
        import deepspeed.runtime.zero.muon.muon_optimizer as real
        from megatron_tokenformer.deepspeed_boundary import MUON_OPTIMIZER, defer_deepspeed_muon_modules
        assert defer_deepspeed_muon_modules() is False and sys.modules[MUON_OPTIMIZER] is real
    """)


# --------------------------------------------------------------------------- the CPU shared-memory op, skipped
@pytest.fixture
def unprobed_ops(monkeypatch):
    """deepspeed.ops before anyone read ``__compatible_ops__``, its probe counted; restored afterwards."""
    import deepspeed.ops as ops

    monkeypatch.setitem(vars(ops), "__compatible_ops__", None)  # (restores what was there, or nothing)
    del vars(ops)["__compatible_ops__"]
    real_probe, probes = ops._probe_compatible_ops, []
    monkeypatch.setattr(ops, "_probe_compatible_ops", lambda: probes.append(1) or real_probe())
    return ops, real_probe, probes


def test_shm_op_skipped_without_probing_every_op(unprobed_ops):
    from deepspeed.comm.torch import build_shm_op

    ops, real_probe, probes = unprobed_ops
    boundary.skip_cpu_shm_comm_build()
    assert build_shm_op() is None and probes == []  # DeepSpeed's CPU backend: nothing built, no op probed
    # any other read gets DeepSpeed's answers (its probe, run once), the shm op still off
    reference = real_probe()
    assert reference["deepspeed_shm_comm"] is True  # what would have been built on this machine
    compatible = ops.__compatible_ops__
    assert compatible.get("cpu_adam") is reference["cpu_adam"] and probes == [1]
    assert dict(compatible) == {**reference, "deepspeed_shm_comm": False} and len(compatible) == len(reference)
    assert sorted(compatible) == sorted(reference) and "async_io" in compatible and probes == [1]
    compatible["deepspeed_shm_comm"] = True  # a later write wins, as on DeepSpeed's own dict
    assert compatible["deepspeed_shm_comm"] is True and compatible == {**reference, "deepspeed_shm_comm": True}


def test_shm_op_skipped_in_an_already_probed_dict(unprobed_ops):
    ops, real_probe, probes = unprobed_ops
    probed = ops.__compatible_ops__  # DeepSpeed's module __getattr__ probes and keeps a plain dict
    assert type(probed) is dict and probes == [1]
    boundary.skip_cpu_shm_comm_build()
    assert ops.__compatible_ops__ is probed and probed == {**real_probe(), "deepspeed_shm_comm": False}


# --------------------------------------------------------------------------- the guard around DeepSpeed's writes
# A failed write does not raise out of DeepSpeed's save_checkpoint (whose collectives every rank must reach);
# it is recorded, its half-written file removed, the rank's later writes skipped, and the engine's own
# methods restored afterwards. A stand-in engine follows DeepSpeed 0.19's order (rank 0 makedirs, barrier,
# model file, ZeRO file, recovery scripts, barrier) and records which steps it got through.
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
    with boundary.guarded_checkpoint_writes(engine) as writes:
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


def test_guarded_writes_stream_through_a_hashing_writer_and_fsync(tmp_path, monkeypatch):
    """Training's form: torch.save writes through the checksum writer; each file is fsynced before its
    checksum is recorded. Reference: the checksum of the bytes on disk, read back afterwards."""
    from megatron_tokenformer.checkpointing.format import checksums
    folder = str(tmp_path / "global_step4.partial")
    engine = StandInEngine(folder)
    engine.checkpoint_engine.save = lambda state_dict, path: torch.save(state_dict, path)
    synced, recorded = [], {}
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))

    def on_written(path, writer):
        assert path in synced                                           # fsynced before it is recorded
        recorded[os.path.basename(path)] = (writer.size, writer.hexdigest())
    with boundary.guarded_checkpoint_writes(engine, checksums.HashingWriter, on_written) as writes:
        engine.save_checkpoint()
    assert writes.error is None
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        assert recorded[name] == checksums.hash_file(os.path.join(folder, name))


# --------------------------------------------------------------------------- ZeRO fragments
def _zero_partitions(shapes, world):
    """Parameters of ``shapes`` flattened one after the other and split into ``world`` equal partitions,
    each rank's mappings made by DeepSpeed's own ``get_hp_fragment_mapping`` (as its ZeRO-1/2 does). The
    fp32 partition of rank r holds the global flat index of each element (the reference), its Adam state
    10x that."""
    from deepspeed.utils.tensor_fragment import get_hp_fragment_mapping
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    offsets = [sum(p.numel() for p in params[:i]) for i in range(len(params))]
    total = sum(p.numel() for p in params)
    size = -(-total // world)
    ranks = []
    for r in range(world):
        flat = torch.arange(r * size, (r + 1) * size, dtype=torch.float32)
        optimizer = torch.optim.AdamW([torch.nn.Parameter(flat)])
        optimizer.state[optimizer.param_groups[0]["params"][0]] = {"exp_avg": flat * 10}
        mappings = {}
        for i, p in enumerate(params):
            if offsets[i] < (r + 1) * size and offsets[i] + p.numel() > r * size:
                mappings[i] = get_hp_fragment_mapping(p, offsets[i], optimizer.param_groups[0]["params"][0], {}, {},
                                                      False, 0, r * size, size)
        ranks.append((optimizer, mappings))
    return params, offsets, ranks


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero_fragment_locates_each_parameters_elements_in_the_flat_partition(world):
    params, offsets, ranks = _zero_partitions([(3, 4), (2, 5), (4, 3)], world)
    covered = {i: [] for i in range(len(params))}
    for optimizer, mappings in ranks:
        for i, p in enumerate(params):
            p._hp_mapping = mappings.get(i)
            fragment = boundary.zero_fragment(p)
            if i not in mappings:
                assert fragment is None
                continue
            expected = offsets[i] + torch.arange(fragment.start, fragment.start + fragment.numel, dtype=torch.float32)
            assert torch.equal(fragment.master, expected)
            assert torch.equal(fragment.optimizer_state(optimizer, "exp_avg"), expected * 10)
            assert fragment.optimizer_state(optimizer, "exp_avg_sq") is None       # no such state yet
            with torch.no_grad():                                               # as io.py and the freezer write it
                fragment.master.add_(0.5)                                       # a view: writes reach ZeRO's partition
            assert torch.equal(mappings[i].hp_fragment, expected + 0.5)
            covered[i] += range(fragment.start, fragment.start + fragment.numel)
    assert all(sorted(covered[i]) == list(range(p.numel())) for i, p in enumerate(params))  # every element once


def test_no_fragment_without_zero():
    assert boundary.zero_fragment(torch.nn.Parameter(torch.zeros(3))) is None


# --------------------------------------------------------------------------- the loss scaler
def test_restore_loss_scaler_round_trips_deepspeeds_dynamic_scaler():
    """The record the format layer takes of a saved DynamicLossScaler, restored into a fresh one: every
    attribute the next steps use comes back; a static scaler never takes a dynamic one's record."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    from megatron_tokenformer.checkpointing.format.deepspeed_files import _loss_scaler_state
    saved = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=100, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    saved.cur_scale, saved.cur_iter, saved.last_overflow_iter, saved.cur_hysteresis = 512.0, 37, 30, 1
    record = _loss_scaler_state(saved)
    optimizer = type("FP16Optimizer", (), {})()
    optimizer.loss_scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=100, min_scale=1, delayed_shift=2,
                                              consecutive_hysteresis=False)
    boundary.restore_loss_scaler(optimizer, record)
    for attr in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):
        assert getattr(optimizer.loss_scaler, attr) == getattr(saved, attr), attr
    assert boundary.current_loss_scale(optimizer.loss_scaler) == 512.0
    optimizer.loss_scaler = LossScaler(scale=8)
    boundary.restore_loss_scaler(optimizer, record)
    assert optimizer.loss_scaler.cur_scale == 8 and boundary.current_loss_scale(optimizer.loss_scaler) == 8.0
    boundary.restore_loss_scaler(optimizer, None)                       # a checkpoint without a scaler
    assert boundary.current_loss_scale(object()) != boundary.current_loss_scale(object())   # NaN: none exposed


# --------------------------------------------------------------------------- the boundary itself
#: DeepSpeed modules any module of the package may import (its public API)
PUBLIC_MODULES = {"deepspeed", "deepspeed.comm", "deepspeed.pipe", "deepspeed.accelerator"}
#: names read from the top-level ``deepspeed`` package (``deepspeed.X`` or ``from deepspeed import X``)
PUBLIC_NAMES = {"initialize", "init_distributed", "comm", "pipe", "accelerator", "PipelineEngine", "__version__"}
#: attributes of DeepSpeed's engines, optimizers, accelerator and fragment mappings that are internals
INTERNAL_ATTRIBUTES = {"_hp_mapping", "hp_fragment", "lp_fragment_address", "hp_fragment_address", "param_group_index",
                       "_hp_optimizer_states_linked", "loss_scaler", "cur_scale", "checkpoint_engine",
                       "_copy_recovery_script", "__compatible_ops__", "is_fp16_supported", "supported_dtypes"}
#: DeepSpeed's command-line entry points (a launcher is recognised by them in a process's command line)
LAUNCHER_MODULES = {"deepspeed.launcher.launch", "deepspeed.launcher.runner"}
_MODULE_NAME = re.compile(r"deepspeed(\.\w+)+")


def deepspeed_reaches(source: str):
    """``[(line, what)]``: where ``source`` reaches past DeepSpeed's public API, by these rules:

    1. an import (anywhere, function bodies included) of a DeepSpeed module not in PUBLIC_MODULES, or
       ``from deepspeed import X`` with X not in PUBLIC_NAMES;
    2. an attribute ``deepspeed.X`` with X not in PUBLIC_NAMES (``deepspeed.ops.__compatible_ops__``);
    3. an attribute named in INTERNAL_ATTRIBUTES, read or written (``param._hp_mapping``);
    4. a string literal that is such an attribute name (``getattr(opt, "cur_scale")``) or the dotted name
       of a DeepSpeed module outside PUBLIC_MODULES and LAUNCHER_MODULES (``find_spec("deepspeed.runtime...")``,
       a ``sys.modules`` key, an optimizer class's module) -- unless it is a dict key (``d["loss_scaler"]``,
       ``d.get("loss_scaler")``, ``{"loss_scaler": ...}``): the name of a record field, not of an attribute.

    Not covered, on purpose: checkpointing/format/ (the caller skips it) reads DeepSpeed's checkpoint
    FILES -- the keys of its state dicts, the attributes of the scaler objects they hold, the class
    paths in its pickles -- which is a file format, read without importing DeepSpeed.
    """
    found, strings, keys = [], [], set()  # keys: string constants used as dict keys (rule 4's exception)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if a.name.split(".")[0] == "deepspeed" and a.name not in PUBLIC_MODULES]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "deepspeed":
            if node.module not in PUBLIC_MODULES:
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.module == "deepspeed":
                found += [(node.lineno, f"from deepspeed import {a.name}") for a in node.names
                          if a.name not in PUBLIC_NAMES]
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "deepspeed" and node.attr not in PUBLIC_NAMES:
                found.append((node.lineno, f"deepspeed.{node.attr}"))
            if node.attr in INTERNAL_ATTRIBUTES:
                found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            keys.add(id(node.slice))
        elif isinstance(node, ast.Dict):
            keys.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("get", "pop", "setdefault") \
                and node.args:
            keys.add(id(node.args[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.append(node)
    for node in strings:
        if id(node) not in keys and (node.value in INTERNAL_ATTRIBUTES or (
                _MODULE_NAME.fullmatch(node.value) and node.value not in PUBLIC_MODULES | LAUNCHER_MODULES)):
            found.append((node.lineno, repr(node.value)))
    return sorted(found)


def test_only_the_boundary_reaches_into_deepspeed():
    """Every module of the package but deepspeed_boundary (and the file-format readers of
    checkpointing/format/) uses DeepSpeed through its public API only (rules: :func:`deepspeed_reaches`)."""
    package = os.path.join(REPO_ROOT, "megatron_tokenformer")
    bad = []
    for folder, _, names in os.walk(package):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == os.path.join(package, "deepspeed_boundary.py") \
                    or folder.startswith(os.path.join(package, "checkpointing", "format")):
                continue
            with open(path) as f:
                bad += [f"{os.path.relpath(path, REPO_ROOT)}:{line}: {what}"
                        for line, what in deepspeed_reaches(f.read())]
    assert not bad, "DeepSpeed internals outside megatron_tokenformer/deepspeed_boundary.py:\n" + "\n".join(bad)


def test_the_boundary_rule_sees_every_kind_of_reach():
    source = textwrap.dedent("""
        import deepspeed
        import deepspeed.comm as dist
        from deepspeed.pipe import PipelineModule
        from deepspeed import initialize, PipelineEngine
        def f(engine, param, opt):
            import deepspeed.ops
            from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
            from deepspeed import zero
            deepspeed.ops.__compatible_ops__["x"] = False
            deepspeed.initialize(model=None)
            m = param._hp_mapping
            getattr(opt, "cur_scale", None)
            setattr(opt, "learning_rate", 1)
            engine.checkpoint_engine.save = None
            importlib.util.find_spec("deepspeed.runtime.zero.muon.muon_optimizer")
            MUON = "deepspeed.runtime.zero.muon.original_muon"
            for attr in ("loss_scale", "cur_scale"):
                pass
            state = {"loss_scaler": 1, "global_steps": 2}
            state["loss_scaler"], state.get("cur_scale"), "python -m deepspeed.launcher.launch"
            launchers = {"deepspeed.launcher.launch", "torch.distributed.run"}
    """)
    assert [what for _, what in deepspeed_reaches(source)] == [
        "import deepspeed.ops", "from deepspeed.runtime.pipe.topology import ...", "from deepspeed import zero",
        ".__compatible_ops__", "deepspeed.ops", "._hp_mapping", "'cur_scale'", ".checkpoint_engine",
        "'deepspeed.runtime.zero.muon.muon_optimizer'", "'deepspeed.runtime.zero.muon.original_muon'", "'cur_scale'"]
    with open(os.path.join(REPO_ROOT, "megatron_tokenformer", "deepspeed_boundary.py")) as f:
        assert deepspeed_reaches(f.read())                              # the boundary itself does all of these
