"""The DeepSpeed boundary: the one module that reaches into DeepSpeed's internals, and the DeepSpeed and
torch versions it is tested with.

The rest of the package uses DeepSpeed only through its public API (``deepspeed.initialize``,
``deepspeed.init_distributed``, ``deepspeed.comm``, ``deepspeed.pipe``, ``deepspeed.accelerator``,
``deepspeed.PipelineEngine``) or through this module (tests/unit/test_deepspeed_boundary.py enforces
it). What is here is correct for DeepSpeed 0.19; another release may move any of it:

* **versions** (:func:`check_versions`): the tested range and the start-up warning;
* **start-up patches**: DeepSpeed's Muon modules deferred until used (:func:`defer_deepspeed_muon_modules`),
  the CPU shared-memory op kept from compiling (:func:`skip_cpu_shm_comm_build`, ``__compatible_ops__``),
  fp16 allowed on the CPU accelerator (:func:`allow_fp16_on_cpu`), the pipeline topology class
  (:func:`pipe_topology`);
* **optimizer state**: the torch optimizer inside DeepSpeed's wrapper (:func:`base_optimizer`), ZeRO's
  fragment of a parameter (:func:`zero_fragment`: the arithmetic of ``_hp_mapping``), the loss scale
  (:func:`current_loss_scale`, :func:`restore_loss_scaler`), the flag that re-links ZeRO's optimizer
  state after it was written from outside (:func:`optimizer_state_replaced`);
* **checkpoint writes** (:func:`guarded_checkpoint_writes`): the checkpoint engine's ``save`` and
  ``makedirs`` and the engine's recovery-script copy, wrapped so that every file is fsynced and a
  failed write is recorded instead of raised between DeepSpeed's collectives.

(torch 2.13 internals -- ``distributed_c10d`` defaults, the NCCL environment variables -- stay with
their users in training/supervision/collective_timeout.py.)

Decision (docs/training.md): a version outside the tested range is **warned about, not refused**
-- one line naming both versions and the range, on rank 0, before anything runs. The pins in
setup.py keep ``pip install`` inside the range, so only a deliberate install (``--no-deps``, a source
build) reaches the warning, and refusing would stop someone testing the next release.

The versions are read from the installed packages' metadata (:func:`importlib.metadata.version`),
so the check imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from megatron_tokenformer.fileio import durable_write, fsync_file

__all__ = ["TESTED_DEEPSPEED", "TESTED_TORCH", "TESTED_PYTHON", "parse_version", "in_range",
           "version_warning", "installed_version", "check_versions",
           "MUON_OPTIMIZER", "ORIGINAL_MUON", "DeferredModule", "load_real_module", "defer_deepspeed_muon_modules",
           "LazyCompatibleOps", "skip_cpu_shm_comm_build", "allow_fp16_on_cpu", "pipe_topology",
           "GROUP_STEP_OPTIMIZERS", "base_optimizer", "ZeroFragment", "zero_fragment", "current_loss_scale",
           "restore_loss_scaler", "optimizer_state_replaced", "SaveWrites", "guarded_checkpoint_writes"]

#: [lowest, first untested) release of each package the code is tested with (setup.py pins the same)
TESTED_DEEPSPEED: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((0, 19), (0, 20))
TESTED_TORCH: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((2, 13), (2, 14))
#: the lowest Python (torch 2.13 requires 3.10; setup.py's python_requires says the same)
TESTED_PYTHON: Tuple[int, int] = (3, 10)


def parse_version(text: str) -> Optional[Tuple[int, ...]]:
    """The numeric release of a version string: ``"2.13.0+cpu"`` -> (2, 13, 0), ``"0.19.8"`` -> (0, 19, 8),
    ``"2.14.0.dev20260101"`` -> (2, 14, 0); None when it does not start with a number."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    if not m:
        return None
    return tuple(int(part) for part in m.group(1).split("."))


def in_range(version: Tuple[int, ...], tested: Tuple[Tuple[int, ...], Tuple[int, ...]]) -> bool:
    """``lowest <= version < first_untested`` (compared on the release numbers)."""
    low, high = tested
    return low <= version < high


def _range_text(tested) -> str:
    low, high = tested
    return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def version_warning(deepspeed_version: Optional[str], torch_version: Optional[str]) -> Optional[str]:
    """One line when either version is outside its tested range (or unreadable), naming both; None when
    both are inside."""
    outside = False
    for text, tested in ((deepspeed_version, TESTED_DEEPSPEED), (torch_version, TESTED_TORCH)):
        parsed = parse_version(text) if text else None
        if parsed is None or not in_range(parsed, tested):
            outside = True
    if not outside:
        return None
    return (f"warning: DeepSpeed {deepspeed_version or 'not installed'} and torch {torch_version or 'not installed'}: "
            f"this code is tested with deepspeed{_range_text(TESTED_DEEPSPEED)} and torch{_range_text(TESTED_TORCH)} "
            f"(it reaches into their internals: checkpoints, ZeRO state, process groups); continuing")


def installed_version(package: str) -> Optional[str]:
    """The installed version of ``package`` from its metadata, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_versions(emit: Callable[[str], None], lookup: Callable[[str], Optional[str]] = installed_version
                   ) -> Optional[str]:
    """Compare the installed DeepSpeed and torch with the tested range; ``emit`` the one-line warning when
    outside. Returns the line (or None)."""
    line = version_warning(lookup("deepspeed"), lookup("torch"))
    if line is not None:
        emit(line)
    return line


# --------------------------------------------------------------------------- DeepSpeed's Muon modules, deferred
# DeepSpeed 0.19 imports ``deepspeed.runtime.zero.muon.muon_optimizer`` in its ZeRO optimizer sanity check
# and ``original_muon`` in every ZeRO-1/2 gradient partition, only to ``isinstance``-check the optimizer or
# to have ``muon_update`` at hand. Importing those modules runs ``torch.compile`` decorators, which import
# inductor: about 2-3 s of CPU per rank at start-up (a third of a small run's start on CPU), for an
# optimizer this engine never builds (``engine.build_optimizer`` makes AdamW or apex FusedAdam).
#
# :func:`defer_deepspeed_muon_modules` puts stand-ins for the two modules into ``sys.modules``:
# ``muon_optimizer.MuonWithAuxAdam`` is a placeholder class (no optimizer here is an instance of it, the
# answer the real class gives for AdamW / FusedAdam); ``original_muon.muon_update`` loads the real module
# on its first call and forwards to it; any other name of either module loads the real module (its code,
# from its own spec), which then replaces the stand-in: behaviour is DeepSpeed's own, only later. Nothing
# is installed when the real modules are already imported or DeepSpeed has no such modules.
MUON_OPTIMIZER = "deepspeed.runtime.zero.muon.muon_optimizer"
ORIGINAL_MUON = "deepspeed.runtime.zero.muon.original_muon"


class DeferredModule(types.ModuleType):
    """A module stand-in holding a few placeholder names; any other name loads the real module."""

    def __init__(self, name: str, spec, placeholders: dict):
        super().__init__(name)
        self.__spec__ = spec
        self.__dict__.update(placeholders)

    def __getattr__(self, attr: str):  # only called for names the stand-in does not hold
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(load_real_module(self.__name__), attr)


def load_real_module(name: str) -> types.ModuleType:
    """The real module ``name`` (executed from its spec once), replacing its stand-in in sys.modules."""
    current = sys.modules.get(name)
    if current is not None and not isinstance(current, DeferredModule):
        return current
    spec = current.__spec__ if current is not None else importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if current is not None:
            sys.modules[name] = current
        raise
    return module


def _muon_update(*args, **kwargs):
    return load_real_module(ORIGINAL_MUON).muon_update(*args, **kwargs)


def defer_deepspeed_muon_modules() -> bool:
    """Install the stand-ins (see above); True when installed now or before."""
    if any(isinstance(sys.modules.get(name), DeferredModule) for name in (MUON_OPTIMIZER, ORIGINAL_MUON)):
        return True
    if MUON_OPTIMIZER in sys.modules or ORIGINAL_MUON in sys.modules:
        return False  # the real modules are loaded already: nothing to save
    try:
        specs = {name: importlib.util.find_spec(name) for name in (MUON_OPTIMIZER, ORIGINAL_MUON)}
    except (ImportError, ValueError):
        return False
    if any(spec is None for spec in specs.values()):
        return False  # a DeepSpeed without Muon
    placeholder = type("MuonWithAuxAdam", (), {"__doc__": "Placeholder: no optimizer of this process is a Muon "
                                                          "optimizer (megatron_tokenformer.deepspeed_boundary)."})
    sys.modules[MUON_OPTIMIZER] = DeferredModule(MUON_OPTIMIZER, specs[MUON_OPTIMIZER],
                                                 {"MuonWithAuxAdam": placeholder})
    sys.modules[ORIGINAL_MUON] = DeferredModule(ORIGINAL_MUON, specs[ORIGINAL_MUON], {"muon_update": _muon_update})
    return True


# --------------------------------------------------------------------------- start-up patches
class LazyCompatibleOps(dict):
    """``deepspeed.ops.__compatible_ops__`` with some entries decided here and the rest probed on first read.

    DeepSpeed 0.19 fills the dict on first access by asking every op builder whether it can build (the
    async-io builder compiles and links a test program: a compiler run per rank). The only reader during
    training is the CPU backend's ``build_shm_op``, which reads the entry decided here; any other read
    (``ds_report``, a user's code) runs DeepSpeed's probe then and sees its answers, the decided entries
    kept.
    """

    def __init__(self, probe: Callable[[], Dict[str, bool]], decided: Dict[str, bool]):
        super().__init__(decided)
        self._probe: Optional[Callable[[], Dict[str, bool]]] = probe
        self._decided = dict(decided)

    def _probed(self) -> "LazyCompatibleOps":
        if self._probe is not None:
            probe, self._probe = self._probe, None
            dict.update(self, {**probe(), **self._decided})
        return self

    def __getitem__(self, key):
        return dict.__getitem__(self if key in self._decided else self._probed(), key)

    def get(self, key, default=None):
        return dict.get(self if key in self._decided else self._probed(), key, default)

    def __contains__(self, key) -> bool:
        return key in self._decided or dict.__contains__(self._probed(), key)

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self._probed(), key, value)
        self._decided.pop(key, None)

    def __iter__(self):
        return dict.__iter__(self._probed())

    def __len__(self) -> int:
        return dict.__len__(self._probed())

    def __eq__(self, other) -> bool:
        return dict.__eq__(self._probed(), other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return dict.__repr__(self._probed())

    def keys(self):
        return dict.keys(self._probed())

    def values(self):
        return dict.values(self._probed())

    def items(self):
        return dict.items(self._probed())

    def copy(self) -> Dict[str, bool]:
        return dict(self._probed())

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at ``init_distributed``.

    On CPU, DeepSpeed 0.19's torch backend builds ``deepspeed_shm_comm`` (a C++ extension, 30-90 s
    of compiling on a small machine, redone whenever a different ``ninja`` runs the build) although
    only ``inference_all_reduce`` uses it; training never does. Marking it incompatible in
    ``deepspeed.ops.__compatible_ops__`` makes the backend skip it (``build_shm_op`` returns None).
    Not probed yet (the usual case), the dict becomes a :class:`LazyCompatibleOps`: the probe of every
    other op (a compiler run) waits until someone reads them. Call before ``deepspeed.init_distributed``.
    """
    try:
        import deepspeed.ops as ops
        compatible = vars(ops).get("__compatible_ops__")
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
        elif compatible is None and callable(getattr(ops, "_probe_compatible_ops", None)):
            ops.__compatible_ops__ = LazyCompatibleOps(ops._probe_compatible_ops, {"deepspeed_shm_comm": False})
        else:  # pragma: no cover - another DeepSpeed layout
            ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # pragma: no cover - another DeepSpeed layout: building the op is harmless
        pass


def allow_fp16_on_cpu() -> None:
    """Let DeepSpeed's CPU accelerator run fp16 on any CPU.

    DeepSpeed 0.19's CPU accelerator reports fp16 as supported only when oneDNN has native fp16
    kernels (AVX512-FP16 / AMX-FP16) and then refuses ``"fp16": {"enabled": true}``. torch runs fp16
    on every CPU (emulated, slowly), which is what a CPU test of the fp16 code path (dynamic loss
    scaling, overflow skipping) needs. On GPUs nothing changes.
    """
    import torch
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True
        supported = accelerator.supported_dtypes
        accelerator.supported_dtypes = lambda: list(dict.fromkeys(supported() + [torch.float16]))


def pipe_topology(num_pp: int, num_mp: int, num_dp: int):
    """DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model; model fastest)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    return PipeModelDataParallelTopology(num_pp=num_pp, num_mp=num_mp, num_dp=num_dp)


# --------------------------------------------------------------------------- optimizer state
#: (module prefix, class name) of DeepSpeed's optimizers that keep Adam's step per param group
GROUP_STEP_OPTIMIZERS = (("deepspeed.ops.adam", "FusedAdam"), ("deepspeed.ops.lamb", "FusedLamb"))


def base_optimizer(optimizer):
    """The torch optimizer inside DeepSpeed's wrapper (ZeRO, fp16, bf16), or ``optimizer`` itself."""
    return getattr(optimizer, "optimizer", optimizer)


@dataclass(frozen=True)
class ZeroFragment:
    """This rank's piece of one parameter under ZeRO-1/2: the elements ``[start, start + numel)`` of the
    flattened parameter.

    ``master`` [numel]: their fp32 master weights (a view into the rank's flat partition, writable).
    ``group_index``: the optimizer's param group whose flat partition holds them, at
    ``[state_offset, state_offset + numel)`` of that partition and of its optimizer state tensors.
    """

    start: int
    numel: int
    master: Any
    group_index: int
    state_offset: int

    def optimizer_state(self, optimizer, key: str):
        """[numel] view of the optimizer state ``key`` (``"exp_avg"``, ...) of these elements in
        ``optimizer`` (the base optimizer, :func:`base_optimizer`); None while it has no such state."""
        flat = optimizer.param_groups[self.group_index]["params"][0]
        state = optimizer.state.get(flat, {})
        if key not in state:
            return None
        return state[key].narrow(0, self.state_offset, self.numel)


def zero_fragment(param) -> Optional[ZeroFragment]:
    """The :class:`ZeroFragment` ZeRO-1/2 keeps of ``param`` on this rank (from its ``_hp_mapping``);
    None when this rank holds none of it (or the optimizer is not ZeRO's)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return ZeroFragment(start=int(mapping.lp_fragment_address.start), numel=int(mapping.lp_fragment_address.numel),
                        master=mapping.hp_fragment.view(-1), group_index=int(mapping.param_group_index),
                        state_offset=int(mapping.hp_fragment_address.start))


def optimizer_state_replaced(optimizer) -> None:
    """After optimizer state was written into ZeRO's flat partitions from outside: ZeRO re-links its
    per-fragment views of the state (``_hp_optimizer_states_linked``) before they are next read."""
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False


def current_loss_scale(optimizer) -> float:
    """The loss scale DeepSpeed's fp16 optimizer applies now (``cur_scale``, or its ``loss_scale``);
    NaN when it exposes neither."""
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, attr, None)
        if value is not None:
            return float(value)
    return float("nan")


def restore_loss_scaler(optimizer, state: Optional[Dict[str, Any]]) -> None:
    """Set the loss scaler of DeepSpeed's optimizer from a checkpoint's ``loss_scaler`` record
    (``cur_scale``, ``cur_iter``, ``last_overflow_iter``, ``cur_hysteresis``, ``dynamic``); only when
    both are dynamic or both static, and only the attributes the scaler has."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if not state or scaler is None or getattr(scaler, "dynamic", False) != state.get("dynamic"):
        return
    for attr, value in state.items():
        if attr != "dynamic" and hasattr(scaler, attr) and value is not None:
            setattr(scaler, attr, value)


# --------------------------------------------------------------------------- checkpoint writes
class SaveWrites:
    """This rank's writes inside DeepSpeed's ``save_checkpoint``: the first failure is kept, not raised.

    DeepSpeed's ``save_checkpoint`` holds collectives between its writes (a barrier before and after,
    the tag check): a rank whose write raised out of it would skip them, the other ranks would wait
    in them for the whole collective timeout, and the save could only end in a generic "collective
    failed". Instead a failed write is recorded (its half-written file removed), this rank's later
    writes are skipped, DeepSpeed goes on through its collectives on every rank, and the caller
    raises :attr:`error` afterwards (training agrees on it: ``checkpointing.save_dir.agree_on_save``).
    """

    def __init__(self):
        self.error: Optional[BaseException] = None

    def run(self, write, *args, path=None, **kwargs):
        """``write(*args, **kwargs)`` unless this rank's save already failed; a failure is recorded and
        the file ``path`` it left half-written removed. Returns what ``write`` returned, or None."""
        if self.error is not None:
            return None  # the save has failed on this rank: nothing more is written
        try:
            return write(*args, **kwargs)
        except (OSError, RuntimeError) as exc:
            self.error = exc
            if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
                try:
                    os.remove(path)  # no truncated file is left behind (the folder goes anyway)
                except OSError:
                    pass
            return None


@contextlib.contextmanager
def guarded_checkpoint_writes(engine, stream: Optional[Callable[[Any], Any]] = None,
                              on_written: Optional[Callable[[str, Any], None]] = None) -> Iterator[SaveWrites]:
    """DeepSpeed's checkpoint writes on this rank, each file fsynced and a failure recorded, not raised
    (:class:`SaveWrites`, yielded). Wraps the checkpoint engine's ``save`` and ``makedirs`` and the
    engine's copy of its recovery scripts (the writes DeepSpeed makes between its collectives), and puts
    the engine's own methods back on leaving.

    ``stream(f)``: what ``torch.save`` writes into instead of the open file ``f`` (e.g. a hashing
    writer); ``on_written(path, stream)`` is called once that file is fsynced and closed.
    """
    writes = SaveWrites()
    patched = []

    def patch(obj, name, make):
        original = getattr(obj, name, None)
        if obj is None or original is None:
            return
        patched.append((obj, name, original, name in vars(obj)))
        setattr(obj, name, make(original))

    def save_fsynced(original):
        def write(state_dict, path, *a, **kw):
            if stream is not None and isinstance(path, (str, os.PathLike)):
                with durable_write(path) as f:
                    writer = stream(f)
                    result = original(state_dict, writer, *a, **kw)
                if on_written is not None:
                    on_written(os.fspath(path), writer)
                return result
            result = original(state_dict, path, *a, **kw)
            if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
                fsync_file(os.fspath(path))
            return result

        def save(state_dict, path, *a, **kw):
            return writes.run(write, state_dict, path, *a, path=path, **kw)
        return save

    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    patch(ckpt_engine, "save", save_fsynced)
    patch(ckpt_engine, "makedirs", lambda original: lambda *a, **kw: writes.run(original, *a, **kw))
    patch(engine, "_copy_recovery_script", lambda original: lambda *a, **kw: writes.run(original, *a, **kw))
    try:
        yield writes
    finally:
        for obj, name, original, own in reversed(patched):
            if own:
                setattr(obj, name, original)
            else:
                try:
                    delattr(obj, name)  # back to the class method
                except AttributeError:
                    setattr(obj, name, original)
