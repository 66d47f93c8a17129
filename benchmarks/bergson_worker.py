"""Bergson 2.5.1's EK-FAC (optionally refined by its conjugate gradient) as a subprocess.

Run in Bergson's own virtual environment (``.venv-bergson``, ``make peers-bergson``) by
``benchmarks/finetune_lds.py``; it imports nothing of influscope. Input: a JSON job file::

    {"model": DIR, "train": train.jsonl, "queries": queries.jsonl, "modules": [...],
     "cg_steps": 0 | k, "cg_batch": B, "token_batch": T, "out": scores.json}

where the ``.jsonl`` rows are ``{"input_ids": [...], "labels": [...]}``. It runs ``bergson
ekfac`` (K-FAC with the eigenvalue correction, true Fisher: labels sampled from the model,
summed token loss, damping ``0.1 × mean(Λ)`` per module, per-query scores) and, with
``cg_steps > 0``, Bergson's ASTRA step with ``solver = cg``: ``cg_steps`` steps of
preconditioned conjugate gradient on the Gauss-Newton system over one random batch of
``cg_batch`` training documents. ``token_batch`` is Bergson's tokens per forward pass (at most
the model's context). Output: ``{"scores": (Q, N), "seconds": s}`` in Bergson's sign
(``∇loss_qᵀ (G + λ)⁻¹ ∇L_i``, i.e. influscope's ``df/dε`` for ``f = −loss_q = log p``).

On CPU, Bergson 2.5.1's CG updates in place tensors that are views of a read-only memory map
(``Astra._read_row``); the process then dies with a segmentation fault (exit 139, no Python
error) at the first CG update. The worker copies those rows (``_read_row`` wrapped to
``.clone()``) — benchmark-side only, no change in what is computed.

    python -m benchmarks.bergson_worker JOB.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import numpy as np
    import torch
    from bergson.__main__ import main as bergson_main
    from bergson.hessians import astra

    torch.set_num_threads(1)
    torch.manual_seed(0)
    read_row = astra.Astra._read_row

    def copied(self, mmap, offsets, row):  # writable copies of the memory-mapped rows
        return {n: t.clone() for n, t in read_row(self, mmap, offsets, row).items()}

    astra.Astra._read_row = copied
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        argv = ["bergson", "ekfac", f"{out}/run", "--model", job["model"]]
        argv += ["--data.dataset", job["train"], "--query.dataset", job["queries"]]
        argv += ["--method", "kfac", "--hessian_cfg.ev_correction", "true"]
        argv += ["--score", "individual", "--query.aggregation", "none"]
        argv += ["--nproc_per_node", "1", "--token_batch_size", str(job["token_batch"])]
        if job.get("cg_steps", 0) > 0:
            argv += ["--num_steps", str(job["cg_steps"]), "--solver", "cg"]
            argv += ["--astra.batch_size", str(job["cg_batch"])]
        argv += ["--index_cfg.modules", *job["modules"]]
        saved, sys.argv = sys.argv, argv
        try:
            bergson_main()
        finally:
            sys.argv = saved
        info = json.loads(Path(f"{out}/run/scores/info.json").read_text())
        fields = ("names", "formats", "offsets", "itemsize")
        dtype = np.dtype({k: info["dtype"][k] for k in fields})
        rows = np.memmap(
            f"{out}/run/scores/scores.bin", dtype=dtype, mode="r", shape=(info["num_rows"],)
        )
        scores = [rows[f"score_{q}"].astype(float).tolist() for q in range(info["num_scores"])]
    seconds = time.perf_counter() - start
    Path(job["out"]).write_text(json.dumps({"scores": scores, "seconds": seconds}))


if __name__ == "__main__":
    main()
