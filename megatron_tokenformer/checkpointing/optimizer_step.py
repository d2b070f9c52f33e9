"""Where an Adam implementation keeps its step count, for writing and reading resharded optimizer state.

torch's Adam/AdamW keep it per parameter (``state[p]["step"]``, a tensor); apex's ``FusedAdam`` and
DeepSpeed's ``FusedAdam`` keep it per parameter group (``param_group["step"]``, an int) and never look at
``state["step"]``. Writing the step where the optimizer does not read it restarts the bias correction:
the first update after a resharded load is then about 1 / sqrt(1 - beta2) * (1 - beta1) larger (~2.2x
with betas (0.9, 0.95) ... up to ~3x) than the one the uninterrupted run makes.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = ["keeps_step_in_param_group", "set_adam_step", "get_adam_step"]

# (module prefix, class name) of optimizers known to count steps per parameter group
_PARAM_GROUP_STEP_CLASSES = (("apex.optimizers", "FusedAdam"), ("apex.optimizers", "FusedLAMB"),
                             ("deepspeed.ops.adam", "FusedAdam"), ("deepspeed.ops.lamb", "FusedLamb"))


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
