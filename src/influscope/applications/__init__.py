"""Applications of influence scores, one module per application (import them directly).

* ``reward_*`` — reward-model bias detection (``influscope bias``; the experiment and the
  from-scratch GPT-2 reward model are ``benchmarks.reward_experiment`` / ``benchmarks.reward_model``);
* :mod:`.unlearn` — remove training sequences with one EK-FAC Newton step (``influscope unlearn``,
  :mod:`influscope.cli.unlearn`); its baselines (gradient ascent, random steps) are
  ``benchmarks.unlearn_baselines``;
* :mod:`.curation` — rank training data by total influence on a benchmark, drop the harmful k %.
"""
