"""Defer DeepSpeed's Muon optimizer modules until something really uses Muon.

DeepSpeed 0.19 imports ``deepspeed.runtime.zero.muon.muon_optimizer`` in its ZeRO optimizer sanity check
and imports ``original_muon`` in every ZeRO-1/2 gradient partition, only to ``isinstance``-check the
optimizer or to have ``muon_update`` at hand. Importing those modules runs ``torch.compile`` decorators,
which import inductor: about 2-3 s of CPU per rank at start-up (a third of a small run's start on CPU),
for an optimizer this engine never builds (``engine.build_optimizer`` makes AdamW or apex FusedAdam).

:func:`defer_deepspeed_muon_modules` puts stand-ins for the two modules into ``sys.modules``:

- ``muon_optimizer.MuonWithAuxAdam`` is a placeholder class: no optimizer here is an instance of it,
  which is the answer the real class would give for AdamW / FusedAdam;
- ``original_muon.muon_update`` loads the real module on its first call and forwards to it;
- any other name of either module loads the real module (its code, from its own spec), which then
  replaces the stand-in: behaviour is DeepSpeed's own, only later.

Nothing is installed when the real modules are already imported or DeepSpeed has no such modules.
"""

from __future__ import annotations

import importlib.util
import sys
import types

MUON_OPTIMIZER = "deepspeed.runtime.zero.muon.muon_optimizer"
ORIGINAL_MUON = "deepspeed.runtime.zero.muon.original_muon"

__all__ = ["defer_deepspeed_muon_modules", "MUON_OPTIMIZER", "ORIGINAL_MUON", "DeferredModule"]


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
    """Install the stand-ins (see the module docstring); True when installed now or before."""
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
                                                          "optimizer (megatron_tokenformer.training.deferred_imports)."})
    sys.modules[MUON_OPTIMIZER] = DeferredModule(MUON_OPTIMIZER, specs[MUON_OPTIMIZER], {"MuonWithAuxAdam": placeholder})
    sys.modules[ORIGINAL_MUON] = DeferredModule(ORIGINAL_MUON, specs[ORIGINAL_MUON], {"muon_update": _muon_update})
    return True
