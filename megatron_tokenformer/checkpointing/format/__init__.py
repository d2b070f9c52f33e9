"""The checkpoint format, without DeepSpeed: what is on disk and how to read and write it.

- :mod:`.files`: the save folder's layout (``latest``, ``global_step<N>``, ``.partial``), crash-safe
  publication, listing and pruning of step folders.
- :mod:`.metadata`: the schema of ``tokenformer_checkpoint.json`` (build, read).
- :mod:`.tensor_file`: lazy reads of ``torch.save`` files (``os.pread``, no whole-file load).
- :mod:`.entries`: the index a reader returns (parameter entries, fragments of lazy tensors).
- :mod:`.deepspeed_files`: DeepSpeed's model and ZeRO files, indexed by plain functions.
- :mod:`.canonical`: the ``canonical`` kind (one full tensor per file): index and writer.
- :mod:`.view`: :class:`CheckpointView`, the canonical-name view of any step folder.
- :mod:`.source`: the :class:`CheckpointSource` protocol views, growth and widening implement.

Importing this package never imports DeepSpeed (tested).
"""

from megatron_tokenformer.checkpointing.format.canonical import CanonicalWriter
from megatron_tokenformer.checkpointing.format.entries import FP32, CheckpointFormatError, ParamEntry
from megatron_tokenformer.checkpointing.format.metadata import build_meta, read_meta
from megatron_tokenformer.checkpointing.format.source import CheckpointSource
from megatron_tokenformer.checkpointing.format.view import CheckpointView, open_checkpoint

__all__ = ["CanonicalWriter", "FP32", "CheckpointFormatError", "ParamEntry", "build_meta", "read_meta",
           "CheckpointSource", "CheckpointView", "open_checkpoint"]
