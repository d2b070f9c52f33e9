"""Shared test helpers, imported as ``tests.helpers.<module>`` (``tests/`` is a package)."""
