"""Applications of influence scores, one module per application (import them directly).

* ``reward_*`` — reward-model bias detection (``influscope bias``);
* :mod:`.unlearn` — remove training sequences with one EK-FAC Newton step (``influscope unlearn``,
  :mod:`influscope.cli.unlearn`); :mod:`.unlearn_baselines` — gradient ascent and random-direction steps;
* :mod:`.curation` — rank training data by total influence on a benchmark, drop the harmful k %.
"""
