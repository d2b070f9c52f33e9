"""Models in and out of the system: Hugging Face export/import (``hf_export``, ``hf_import``), the
official TokenFormer checkpoints (``official``), text generation (``generation``).

The ``hf/`` folder holds the self-contained ``configuration_tokenformer.py`` and
``modeling_tokenformer.py`` copied into every export (they import only torch and transformers).
Nothing here is imported by training; ``transformers``/``safetensors`` come from the ``[hf]`` extra.
"""
