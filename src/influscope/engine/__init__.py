"""What every stage shares: the stage runner (:mod:`.stage`: load a stored stage, or compute
it resumably, or refuse it as stale), sharded passes and partial sums (:mod:`.shards`: what
makes a pass resumable and splits it over ranks) and the distributed helpers
(:mod:`.distributed`).

Import the modules directly (``from influscope.engine.stage import run_stage``); this package
imports nothing, so its bottom layer (:mod:`.distributed`) stays importable from everywhere.
"""
