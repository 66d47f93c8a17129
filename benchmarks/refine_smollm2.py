"""Why the SmolLM2-135M refinement residual grew, and which solver settings make it fall.

A small SmolLM2-135M-Instruct setting that a shared CPU can run (issue 21.3): the MLP
projections of the last ``--blocks`` blocks tracked, ``--n-train`` Shakespeare windows of
``--tokens`` tokens, the self-consistency queries of ``benchmarks.smollm2_trust`` (window
``i``'s own first tokens), EK-FAC fitted once. Then each solver variant runs ``--steps``
iterations from EK-FAC's ``P^{-1}b`` and we record, per query:

* the residual history the solver reports (on its own Gauss-Newton products), and
* the relative residual ``‖b − (G + Λ)v‖/‖b‖`` of the final ``v`` over *all* training
  windows (one extra product), the honest common yardstick;
* the power-iteration estimate ``μ̂`` of ``μ_max(P^{-1}(G + Λ))``.

Variants: CG with a fresh random subset per step (the solver before this change, loaded from
``--old-refine`` when given), CG on one fixed subset, CG on all windows, Neumann and ASTRA with
the automatic step, and CG with a preconditioner damped more than the system
(``--precond-factors``: ``P`` re-damped to factor × mean eigenvalue, ``Λ`` of the system kept).

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.refine_smollm2 --assets .cache/assets
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import torch

from benchmarks.smollm2_trust import datasets
from influscope import FitConfig, Influence
from influscope.assets import smollm2_gguf
from influscope.loading import load_model
from influscope.reference import per_example_gradients
from influscope.scoring.damping import redamp
from influscope.solvers import GaussNewtonProduct, refine_queries
from influscope.solvers.refine import power_alpha


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=None, help="asset cache directory")
    p.add_argument("--n-train", type=int, default=16, help="training windows (default 16)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per window (default 64)")
    p.add_argument("--n-queries", type=int, default=2, help="queries (default 2)")
    p.add_argument("--query-tokens", type=int, default=32, help="tokens per query (default 32)")
    p.add_argument("--blocks", type=int, default=2, help="last blocks whose MLP is tracked")
    p.add_argument("--steps", type=int, default=10, help="iterations per variant (default 10)")
    p.add_argument("--examples", type=int, default=8, help="refine_examples (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="mini-batch (default 8)")
    p.add_argument(
        "--precond-factors", type=float, nargs="*", default=[1.0], help="P damping factors"
    )
    p.add_argument("--power-steps", type=int, default=4, help="power iterations for μ̂")
    p.add_argument("--old-refine", default=None, help="path of the former solvers/refine.py")
    p.add_argument("--variants", nargs="*", default=None, help="run only these variants")
    p.add_argument("--out", type=Path, default=Path("runs/refine_smollm2.json"))
    args = p.parse_args()
    if args.assets:
        os.environ["INFLUSCOPE_ASSETS"] = str(args.assets)
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_model(smollm2_gguf())
    n = model.config.num_hidden_layers
    pattern = (
        rf"model\.layers\.({'|'.join(str(b) for b in range(n - args.blocks, n))})"
        r"\.mlp\.(gate|up|down)_proj"
    )
    inf = Influence(model, "causal_lm", modules=pattern, tokenizer=tok)
    train, queries = datasets(tok, args.n_train, args.tokens, args.n_queries, args.query_tokens)
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=args.batch_size))
    n_params = sum(layer.numel for layer in inf.layers)
    print(f"loaded + fitted in {time.time() - t0:.0f} s; P = {n_params:,}", flush=True)
    task = inf.task
    b = per_example_gradients(model, task, inf.layers, queries, "measurement")
    product = GaussNewtonProduct(model, task, inf.layers, op.damping, args.batch_size)

    def full_residual(v: dict[str, torch.Tensor]) -> list[float]:
        bf, vf = product.flatten(b), product.flatten(v)
        r = bf - product.damped(vf, train)
        return (r.norm(dim=1) / bf.norm(dim=1)).tolist()

    def start_of(pre):
        return {k: pre.precondition(k, g) for k, g in b.items()}

    results = {"setting": vars(args) | {"out": str(args.out), "P": n_params}, "rows": []}
    start = start_of(op)
    results["ekfac_full_residual"] = full_residual(start)
    start_residual = {id(op): results["ekfac_full_residual"]}
    flat_b = product.flatten(b)
    r0 = flat_b - product.damped(product.flatten(start), train)

    def apply_with(pre):
        return lambda r: product.flatten(
            {k: pre.precondition(k, x) for k, x in product.unflatten(r).items()}
        )

    mu = 1 / power_alpha(product, apply_with(op), r0, train, args.power_steps)
    results["mu_max_estimate"] = mu.tolist()
    print(f"EK-FAC full residual {results['ekfac_full_residual']}; μ̂_max {mu.tolist()}")

    variants = [
        ("cg fixed subset", dict(method="cg", examples=args.examples), op),
        ("cg all windows", dict(method="cg", examples=None), op),
        ("neumann auto α, fixed subset", dict(method="neumann", examples=args.examples), op),
        ("astra auto α", dict(method="astra", examples=args.examples), op),
        (
            "cg fixed subset, scaled start",
            dict(method="cg", examples=args.examples, scale_start=True),
            op,
        ),
        (
            "astra auto α, scaled start",
            dict(method="astra", examples=args.examples, scale_start=True),
            op,
        ),
    ]
    for f in args.precond_factors:  # the fit's damping factor is 0.1
        pre = redamp(op, damping_factor=f)
        cg = dict(method="cg", examples=args.examples)
        variants.append((f"cg fixed subset, P damping factor {f}", cg, pre))
    if args.old_refine:
        spec = importlib.util.spec_from_file_location("old_refine", args.old_refine)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        before = dict(method="cg", examples=args.examples, old=old)
        variants.insert(0, ("cg fresh subset per step (before)", before, op))
    for name, kw, pre in variants:
        if args.variants and not any(v in name for v in args.variants):
            continue
        kw = dict(kw)
        old = kw.pop("old", None)
        t = time.time()
        x0 = start_of(pre)
        if id(pre) not in start_residual:
            start_residual[id(pre)] = full_residual(x0)
        try:
            if old is not None:
                v, hist = old.refine_queries(
                    product, pre, b, x0, train, steps=args.steps, seed=0, **kw
                )
            else:
                v, hist = refine_queries(product, pre, b, x0, train, steps=args.steps, seed=0, **kw)
            row = {
                "variant": name,
                "history": hist.tolist(),
                "full_residual_start": start_residual[id(pre)],
                "full_residual_end": full_residual(v),
                "seconds": time.time() - t,
            }
        except Exception as e:  # a diverging variant is a result too
            row = {"variant": name, "error": str(e)[:300], "seconds": time.time() - t}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
