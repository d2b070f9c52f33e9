"""Checkpoints: the on-disk format without DeepSpeed (:mod:`.format`: folder layout, metadata,
DeepSpeed's files and canonical folders, :class:`~.format.view.CheckpointView`), resharding into any
layout (:mod:`.reshard`), parameter-token and depth growth (:mod:`.grow`), Net2Net widening
(:mod:`.net2net`), the conversion tool's pipeline (:mod:`.expand`) and the DeepSpeed adapter for
save/load with exact resume (:mod:`.io`). docs/checkpoints.md has the code map.

Submodules are imported on use (``from megatron_tokenformer.checkpointing import io``) so that the
offline tools do not pay for DeepSpeed where they do not need it.
"""
