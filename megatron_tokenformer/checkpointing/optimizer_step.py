"""Where an Adam implementation keeps its step count, for writing and reading resharded optimizer state.

torch's Adam/AdamW keep it per parameter (``state[p]["step"]``, a tensor); apex's ``FusedAdam`` and
DeepSpeed's ``FusedAdam`` keep it per parameter group (``param_group["step"]``, an int) and never look at
``state["step"]``. Writing the step where the optimizer does not read it restarts the bias correction: the
first update after a resharded load is then about 1 / sqrt(1 - beta2) * (1 - beta1) larger (~2.2x with betas
(0.9, 0.95) ... up to ~3x) than the one the uninterrupted run makes.

Which one is used depends on the machine (apex's FusedAdam when its CUDA extension loads, torch's AdamW
otherwise), so a checkpoint may be resumed by the other kind. The metadata of a training step folder records the
writer's (:func:`describe_optimizer`: ``"optimizer": {"class": ..., "adam_step": "param_group" |
"parameter"}``), and every load path puts the step where the optimizer in use reads it: the resharding path
through :func:`set_adam_step`, DeepSpeed's own (same layout) load inside :func:`adam_step_conversion` (the
state is converted on its way into ``load_state_dict``). Without the conversion torch's AdamW fails on an apex
checkpoint (``KeyError: 'step'``) and apex restarts the bias correction on a torch one. Checkpoints written
before the field existed have no ``"optimizer"``: the step is then taken from wherever the loaded state holds
it (the parameter state first, then the group), as the loaders always did.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch

from megatron_tokenformer.deepspeed_boundary import GROUP_STEP_OPTIMIZERS

__all__ = ["keeps_step_in_param_group", "set_adam_step", "get_adam_step", "STEP_IN_PARAM_GROUP",
           "STEP_PER_PARAMETER", "step_layout", "describe_optimizer", "saved_step_layout", "convert_state_dict_step",
           "adam_step_conversion", "convert_loaded_adam_step"]

#: where an optimizer keeps Adam's step (the metadata's ``optimizer.adam_step``)
STEP_IN_PARAM_GROUP = "param_group"
STEP_PER_PARAMETER = "parameter"

# (module prefix, class name) of optimizers known to count steps per parameter group
_PARAM_GROUP_STEP_CLASSES = (("apex.optimizers", "FusedAdam"), ("apex.optimizers", "FusedLAMB"),
                             *GROUP_STEP_OPTIMIZERS)


def keeps_step_in_param_group(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers that read the step from ``param_group["step"]``.

    Known classes (by module and name, without importing apex), classes that declare
    ``step_in_param_group = True``, and any optimizer whose groups already carry a ``"step"``.
    """
    if getattr(optimizer, "step_in_param_group", False):
        return True
    for cls in type(optimizer).__mro__:
        for module, name in _PARAM_GROUP_STEP_CLASSES:
            if cls.__name__ == name and cls.__module__.startswith(module):
                return True
    return any("step" in group for group in optimizer.param_groups)


def set_adam_step(optimizer: torch.optim.Optimizer, group_index: int, state: Dict[str, Any], step: float) -> None:
    """Set the step of group ``group_index`` (whose parameter's state dict is ``state``) where
    ``optimizer`` reads it. ``state["step"]`` is a float32 tensor as torch's Adam keeps it."""
    if keeps_step_in_param_group(optimizer):
        optimizer.param_groups[group_index]["step"] = int(step)
        state.pop("step", None)  # not read; a stale copy would only mislead
    else:
        state["step"] = torch.tensor(float(step), dtype=torch.float32)


def get_adam_step(param_group: Optional[Dict[str, Any]], state: Optional[Dict[str, Any]]) -> Optional[Any]:
    """The step of a saved group: ``state["step"]`` when present, else ``param_group["step"]``; None if neither."""
    if state is not None and state.get("step") is not None:
        return state["step"]
    if param_group is not None and param_group.get("step") is not None:
        return param_group["step"]
    return None


def step_layout(optimizer: torch.optim.Optimizer) -> str:
    """:data:`STEP_IN_PARAM_GROUP` or :data:`STEP_PER_PARAMETER` for ``optimizer`` (call it before loading a
    state into it: a loaded foreign state may carry a group ``"step"`` the optimizer never reads)."""
    return STEP_IN_PARAM_GROUP if keeps_step_in_param_group(optimizer) else STEP_PER_PARAMETER


def describe_optimizer(optimizer: torch.optim.Optimizer) -> Dict[str, str]:
    """The metadata record of the optimizer that wrote a checkpoint: its class and where it keeps the step."""
    cls = type(optimizer)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "adam_step": step_layout(optimizer)}


def saved_step_layout(meta: Dict[str, Any]) -> Optional[str]:
    """The writer's step layout from a step folder's metadata; None for checkpoints written before it was
    recorded (then the step is wherever the loaded state holds it)."""
    layout = (meta.get("optimizer") or {}).get("adam_step")
    return layout if layout in (STEP_IN_PARAM_GROUP, STEP_PER_PARAMETER) else None


def _pick_step(in_group, in_state, prefer: Optional[str]) -> Optional[float]:
    order = (in_group, in_state) if prefer == STEP_IN_PARAM_GROUP else (in_state, in_group)
    for step in order:
        if step is not None:
            return float(step.item() if torch.is_tensor(step) else step)
    return None


def _place_step(group: Dict[str, Any], states, step: float, here: str) -> None:
    """Put ``step`` in ``group`` or in every (non-empty) parameter state of it, whichever ``here`` reads."""
    if here == STEP_IN_PARAM_GROUP:
        group["step"] = int(step)
        for st in states:
            st.pop("step", None)
    else:
        group.pop("step", None)
        for st in states:
            old = st.get("step")
            device = old.device if torch.is_tensor(old) else torch.device("cpu")
            st["step"] = torch.tensor(step, dtype=torch.float32, device=device)


def convert_state_dict_step(state_dict: Dict[str, Any], here: str, saved: Optional[str]) -> Dict[str, Any]:
    """A copy of an optimizer ``state_dict`` (torch's format: ``state`` by parameter index, ``param_groups``
    listing indices) with each group's step where an optimizer of layout ``here`` reads it. ``saved`` (the
    writer's layout; None when not recorded) says which copy to trust when both exist. The input is not
    modified. torch's Adam refuses a state without ``state["step"]`` already in ``load_state_dict``, so the
    conversion must happen before the load."""
    state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state_dict.get("state", {}).items()}
    groups = [dict(g) for g in state_dict.get("param_groups", [])]
    for group in groups:
        states = [state[i] for i in group.get("params", []) if isinstance(state.get(i), dict) and state[i]]
        in_state = next((st["step"] for st in states if st.get("step") is not None), None)
        step = _pick_step(group.get("step"), in_state, saved)
        if step is not None:
            _place_step(group, states, step, here)
    return dict(state_dict, state=state, param_groups=groups)


@contextlib.contextmanager
def adam_step_conversion(optimizer: torch.optim.Optimizer, saved: Optional[str]):
    """Within the block, ``optimizer.load_state_dict`` (however deep inside DeepSpeed it is called) converts
    the step of the state it is given to this optimizer's layout first; afterwards
    :func:`convert_loaded_adam_step` tidies what a loader wrote after the load (DeepSpeed's elastic ZeRO load
    sets a group ``"step"`` for every optimizer)."""
    here = step_layout(optimizer)  # before the load: a foreign state may add group steps
    original = optimizer.load_state_dict

    def load_state_dict(state_dict, *args, **kwargs):
        return original(convert_state_dict_step(state_dict, here, saved), *args, **kwargs)

    optimizer.load_state_dict = load_state_dict
    try:
        yield here
    finally:
        try:
            del optimizer.load_state_dict  # back to the class method
        except AttributeError:
            optimizer.load_state_dict = original
    convert_loaded_adam_step(optimizer, here, saved)


def convert_loaded_adam_step(optimizer: torch.optim.Optimizer, here: str, saved: Optional[str]) -> int:
    """After a state was loaded into ``optimizer`` (whose layout, taken before the load, is ``here``), put
    each group's step where ``here`` reads it and drop the copy it does not read. ``saved`` as in
    :func:`convert_state_dict_step`. Returns the number of groups whose step was found (groups without
    any state, e.g. never stepped, are left alone)."""
    found = 0
    for group in optimizer.param_groups:
        states = [optimizer.state[p] for p in group["params"] if optimizer.state.get(p)]
        in_state = next((st["step"] for st in states if st.get("step") is not None), None)
        step = _pick_step(group.get("step"), in_state, saved)
        if step is None:
            continue
        found += 1
        _place_step(group, states, step, here)
    return found
