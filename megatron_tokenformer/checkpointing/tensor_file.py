"""Old import path of :mod:`.format.tensor_file`."""

from megatron_tokenformer.checkpointing.format.tensor_file import LazyTensor, TorchFile, materialize  # noqa: F401
