"""Old import path: the folder layout is :mod:`.format.files`, the metadata schema :mod:`.format.metadata`,
the durability primitives :mod:`megatron_tokenformer.fileio`."""

from megatron_tokenformer.checkpointing.format.files import (CANONICAL_DIR, LATEST_FILE, META_FILE,  # noqa: F401
                                                             PARTIAL_SUFFIX, REPORT_FILE, STEP_PREFIX, TOKENIZER_FILE,
                                                             list_step_dirs, prune_checkpoints, publish_step_dir,
                                                             read_latest, remove_stale_partials, remove_step_dirs,
                                                             resolve_step_dir,
                                                             rng_file_name, step_tag, update_latest)
from megatron_tokenformer.checkpointing.format.metadata import (FORMAT_VERSION, KIND_CANONICAL,  # noqa: F401
                                                                KIND_DEEPSPEED, jsonable, read_meta, write_json)
from megatron_tokenformer.fileio import atomic_write_text, fsync_dir, fsync_file, fsync_tree  # noqa: F401
