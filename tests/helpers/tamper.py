"""Damage checkpoint files the way an attacker or a bad disk would (the trust and integrity tests).

* :func:`plant_payload`: add an object whose ``__reduce__`` runs ``touch MARKER`` (``os.system``) to a
  torch.save file; loading it with plain pickle creates the marker.
* :func:`flip_tensor_byte`: flip one byte in the middle of the largest tensor record of a torch.save
  file (not in the zip headers or directory: the file still opens as a valid archive).
"""

from __future__ import annotations

import os
import zipfile

import torch


class Payload:
    """Pickles as ``os.system("touch <marker>")``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# what the refusal names (os.system pickles under the module that defines it)
PAYLOAD_GLOBAL = f"{os.system.__module__}.system"


def plant_payload(path: str, marker: str) -> None:
    """Add ``{"extra": Payload(marker)}`` to the dict saved in ``path`` (our own, trusted file)."""
    obj = torch.load(path, weights_only=False)
    assert isinstance(obj, dict), type(obj)
    obj["extra"] = Payload(marker)
    torch.save(obj, path)
    assert not os.path.exists(marker)


def flip_tensor_byte(path: str) -> int:
    """Flip a byte inside the largest ``data/<key>`` record of ``path``; returns its file offset."""
    reader = torch._C.PyTorchFileReader(path)
    records = [r for r in reader.get_all_records() if r.startswith("data/")]
    sizes = {r: len(bytes(reader.get_record(r))) for r in records}
    name = max(records, key=lambda r: sizes[r])
    offset = int(reader.get_record_offset(name)) + sizes[name] // 2
    del reader
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    assert zipfile.is_zipfile(path)  # the archive's structure is intact: only the checksum can tell
    return offset


def record_checksums(step_dir: str) -> None:
    """Re-record the checksums of every file of ``step_dir`` (one manifest, rank 0), as a writer of the
    folder's present content would: for tests that build a consistent checkpoint by editing a real one."""
    import json

    from megatron_tokenformer.checkpointing.format import checksums
    from megatron_tokenformer.checkpointing.format.files import META_FILE
    for name in checksums.manifest_names(step_dir):
        os.remove(os.path.join(step_dir, name))
    meta_path = os.path.join(step_dir, META_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    meta["checksums"] = checksums.metadata_entry(1)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    recorder = checksums.ChecksumRecorder(step_dir)
    for root, _, names in os.walk(step_dir):
        for n in names:
            recorder.record_file(os.path.join(root, n))
    recorder.write_manifest(0, fsync=False)
