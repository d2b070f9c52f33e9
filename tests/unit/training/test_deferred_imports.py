"""training/deferred_imports.py: DeepSpeed's Muon modules stand in until something needs them.

Each check runs in a fresh interpreter (the stand-ins live in sys.modules). Reference: DeepSpeed's real
modules, loaded by the import system where the check says so.
"""

import subprocess
import sys
import textwrap

from tests.helpers.paths import REPO_ROOT


def run(code):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_isinstance_checks_answer_without_compiling():
    out = run("""
        import sys, torch, deepspeed
        from megatron_tokenformer.training.deferred_imports import defer_deepspeed_muon_modules, MUON_OPTIMIZER
        assert defer_deepspeed_muon_modules() and defer_deepspeed_muon_modules()  # idempotent
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
        from deepspeed.runtime.zero.muon.original_muon import muon_update
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        assert not isinstance(opt, MuonWithAuxAdam) and callable(muon_update)
        # DeepSpeed's ZeRO support check, with its logging rank query answered
        import deepspeed.runtime.zero.utils as zu
        zu.dist.get_rank = lambda *a, **k: 0
        assert zu.is_zero_supported_optimizer(opt)
        print("inductor loaded:", "torch._inductor.compile_fx" in sys.modules)
    """)
    assert "inductor loaded: False" in out


def test_other_names_load_the_real_module():
    run("""
        import sys, deepspeed
        from megatron_tokenformer.training.deferred_imports import (DeferredModule, ORIGINAL_MUON,
                                                                    defer_deepspeed_muon_modules)
        defer_deepspeed_muon_modules()
        stand_in = sys.modules[ORIGINAL_MUON]
        assert isinstance(stand_in, DeferredModule)
        adam_update = stand_in.adam_update  # not a placeholder: the real module is executed
        real = sys.modules[ORIGINAL_MUON]
        assert not isinstance(real, DeferredModule) and real.adam_update is adam_update
        assert real.__file__.endswith("original_muon.py")
        # the stand-in's muon_update forwards to the real function
        calls = []
        real.muon_update = lambda *a, **k: calls.append((a, k)) or "real"
        assert stand_in.muon_update(1, 2, beta=3) == "real" and calls == [((1, 2), {"beta": 3})]
    """)


def test_nothing_installed_over_real_modules():
    run("""
        import sys, deepspeed
        import deepspeed.runtime.zero.muon.muon_optimizer as real
        from megatron_tokenformer.training.deferred_imports import MUON_OPTIMIZER, defer_deepspeed_muon_modules
        assert defer_deepspeed_muon_modules() is False and sys.modules[MUON_OPTIMIZER] is real
    """)
