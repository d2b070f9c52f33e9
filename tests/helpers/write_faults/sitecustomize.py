"""Test-only fault injection: ``torch.save`` into a chosen path fails with ENOSPC on chosen ranks.

Put this folder first on ``PYTHONPATH`` of a training run (Python imports ``sitecustomize`` at start)
and set ``TOKENFORMER_TEST_ENOSPC_RANKS`` (e.g. ``"1"``) and ``TOKENFORMER_TEST_ENOSPC_PATH`` (a
substring of the target path, e.g. ``"global_step4.partial"``). A matching save writes half of
its bytes, then raises ``OSError(ENOSPC)`` naming the file -- what a disk that fills up mid-file
does -- so the failure is deterministic and on one rank only. Nothing else is changed.
"""

import errno
import importlib.abc
import importlib.machinery
import io
import os
import sys

_RANKS = {r.strip() for r in os.environ.get("TOKENFORMER_TEST_ENOSPC_RANKS", "").split(",") if r.strip()}
_PATH = os.environ.get("TOKENFORMER_TEST_ENOSPC_PATH", "")


def _patch(torch) -> None:
    original = torch.save

    def save(obj, f, *args, **kwargs):
        target = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")
        rank = os.environ.get("RANK", "0")
        if rank in _RANKS and _PATH and _PATH in str(target):
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
            else:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return original(obj, f, *args, **kwargs)

    torch.save = save


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Patches ``torch.save`` right after ``torch`` is imported (then steps aside)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


if _RANKS and _PATH:
    sys.meta_path.insert(0, _AfterTorch())
