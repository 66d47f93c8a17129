"""The pieces of ``python -m benchmarks.gpu_check`` (issue 7), one module per stage.

* :mod:`.common` — :class:`~.common.Sizes` (``FULL``, ``QUICK``), the log, timing, peak memory,
  the device choice;
* :mod:`.cuda_tests` — (a) the CUDA test subset in a subprocess under a watchdog;
* :mod:`.model` — (b) a Llama with random weights and random token data;
* :mod:`.plan` — calibration of the per-block costs and the choice of blocks;
* :mod:`.influscope_stage` — (b) influscope's EK-FAC fit, query gradients and scores;
* :mod:`.kronfluence_stage` — (c) the same with Kronfluence;
* :mod:`.report` — (d) the environment and the markdown report.
"""
