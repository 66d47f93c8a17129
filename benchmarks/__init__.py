"""Benchmarks and experiments: scripts run as ``python -m benchmarks.<name>`` from the repo root.

The library (``src/influscope``) never imports this package. Besides the scripts it holds the
experiment code they share (and that the test suite checks at reduced size):

* :mod:`benchmarks.common`, :mod:`benchmarks.app_common`, :mod:`benchmarks.lds_setup` — shared
  set-ups and report helpers;
* :mod:`benchmarks.dda_setup` — the hallucination-tracing set-up of ``benchmarks.dda``;
* :mod:`benchmarks.reward_experiment`, :mod:`benchmarks.reward_model` — the reward-bias
  experiment of ``benchmarks.reward_bias``;
* :mod:`benchmarks.unlearn_baselines` — gradient ascent and random steps for ``benchmarks.unlearn``;
* :mod:`benchmarks.sentiment` — the MiniLM classifier of ``benchmarks.accuracy_mislabel``;
* :mod:`benchmarks.gpu` — the pieces of ``benchmarks.gpu_check``.
"""
