"""The one-host layout runs (tests/integration/training/test_layouts.py), shared by the session: the same
tiny Tokenformer, seed and data for ITERS iterations at a (TP, PP, DP, ZeRO stage, recomputation)
layout on this host (the ranks forked by the suite's fork server, tests/helpers/zygote.py: torchrun's
one-host launch with the imports paid once). The multi-node tests (tests/integration/multinode/) compare their
runs across simulated hosts with these, so each layout runs once per session whichever module asks
first.

Imported as ``helpers.layout_runs``; the pool is the session fixture ``layout_pool``
(tests/integration/conftest.py)."""

from __future__ import annotations

import sys
import time
from typing import Dict, Iterable, Tuple

from tests.helpers import train_runs

ITERS = 10
TRAIN = ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS), "--lr", "2e-3",
         "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--clip-grad", "0.5",
         "--weight-decay", "0.01", "--mock-data", "--vocab-size", "100", "--seed", "1234", "--log-interval", "1",
         "--eval-iters", "0"]
CONCURRENCY = 2
TIMEOUT = 240

Layout = Tuple  # (tp, pp, dp, zero stage, 0/1 recomputation or a tuple of extra flags; --context-parallel-size
                #  among them multiplies the ranks)


def layout_flags(layout: Layout):
    """The training flags of ``layout`` (model and TRAIN included), without the launcher."""
    tp, pp, dp, zero, recompute = layout
    extra = list(recompute) if isinstance(recompute, tuple) else (["--checkpoint-activations"] if recompute else [])
    return train_runs.TINY_MODEL + TRAIN + train_runs.layout_args(tp, pp) + ["--zero-stage", str(zero)] + extra


def command(layout: Layout):
    tp, pp, dp = layout[:3]
    extra = layout[4] if isinstance(layout[4], tuple) else ()
    cp = int(extra[extra.index("--context-parallel-size") + 1]) if "--context-parallel-size" in extra else 1
    return train_runs.warm_launch(tp * pp * cp * dp, layout_flags(layout))


def run_all(layouts: Iterable[Layout], what: str) -> Dict[Layout, str]:
    """layout -> stdout of its run (CONCURRENCY at a time); reports the total wall time."""
    t0 = time.time()
    pending = list(layouts)
    running, logs = [], {}
    while pending or running:
        while pending and len(running) < CONCURRENCY:
            layout = pending.pop(0)
            running.append((layout, train_runs.start(command(layout)), time.time()))
        layout, proc, started = running.pop(0)
        logs[layout] = train_runs.check_ok(train_runs.finish(proc, max(10.0, TIMEOUT - (time.time() - started))))
    print(f"\n[{what}] {len(logs)} runs in {time.time() - t0:.1f} s wall", file=sys.stderr)
    return logs


class LayoutPool:
    """Runs each layout at most once; ``logs(layouts, what)`` runs the missing ones together."""

    def __init__(self):
        self._logs: Dict[Layout, str] = {}

    def logs(self, layouts: Iterable[Layout], what: str = "layout runs") -> Dict[Layout, str]:
        layouts = list(layouts)
        missing = [l for l in dict.fromkeys(layouts) if l not in self._logs]
        if missing:
            self._logs.update(run_all(missing, what))
        return {l: self._logs[l] for l in layouts}
