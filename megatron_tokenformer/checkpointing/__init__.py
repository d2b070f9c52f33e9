"""Checkpoints: DeepSpeed-layout save/load with exact resume (:mod:`.io`), a layout-independent view
of any checkpoint (:mod:`.reshard`), parameter-token and depth growth (:mod:`.grow`).

Submodules are imported on use (``from megatron_tokenformer.checkpointing import io``) so that the
offline tools do not pay for DeepSpeed where they do not need it.
"""
