"""Model-independent math shared by ``model/`` and ``tensor_parallel/`` (imports only torch)."""
