"""Peak memory of the covariance reduction alone (issue 22): does a one-shard fit hold its
float64 sums once or twice?

Six bias-free 2048 → 2048 layers (``8K`` = 384 MiB of float64 sums), one shard of four tiny
batches of random captures, no model pass. Prints the process's peak (``ru_maxrss``) above
its resident size before the pass.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.covariance_memory
"""

from __future__ import annotations

import os
import resource

import torch
from torch import nn

from influscope.curvature.statistics import covariances
from influscope.engine.shards import ShardedPasses
from influscope.modules.capture import LayerBatch
from influscope.modules.selection import select_layers


def main() -> None:
    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(6)])
    layers = select_layers(model, [str(i) for i in range(6)])

    def make(desc, positions):
        for s in range(0, len(positions), 4):
            pos = list(positions[s : s + 4])
            g = {
                layer.name: LayerBatch(
                    torch.randn(len(pos), 8, 2048), torch.randn(len(pos), 8, 2048), None
                )
                for layer in layers
            }
            yield pos, g, torch.zeros(len(pos))

    passes = ShardedPasses(make, 16, 4, 256)
    with open("/proc/self/statm") as fh:
        rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    cov, _ = covariances(passes, layers, torch.float64)
    k = sum(c.a.numel() + c.s.numel() for c in cov.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"8K = {8 * k / 2**20:.0f} MiB; covariance pass peak above the start: ", end="")
    print(f"{(peak - rss) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
