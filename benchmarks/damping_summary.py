"""Damping across every benchmark: which rule is best, or within noise of best, everywhere?

Reads the stored results of the five damping sweeps (run them first, commands below) and
writes the cross-benchmark table to the "## Damping across benchmarks" section of
``docs/accuracy.md``:

    python -m benchmarks.damping_sweep --assets .cache/assets --out runs/damping --write-docs
    python -m benchmarks.accuracy_exact --out runs/accuracy/exact --damping-sweep
    python -m benchmarks.accuracy_lds --subsets 100 --out runs/accuracy/lds --damping-sweep
    python -m benchmarks.accuracy_mislabel --out runs/accuracy/mislabel_damp --curvatures ekfac \\
        --no-kronfluence --no-heldout --damping-sweep
    python -m benchmarks.smollm2_trust --assets .cache/assets --report docs/accuracy.md
    python -m benchmarks.damping_summary --write-docs

Each benchmark's noise is the standard error of its criterion: s.e.m. over queries for LDS,
the binomial ``√(p(1−p)/Q)`` for planted top-1, std/√seeds for the mislabel AUC. A setting is
*within noise* on a benchmark when its gap to that benchmark's best is at most 2 s.e.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

COMMAND = "python -m benchmarks.damping_summary --write-docs"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(root: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """``{benchmark: {setting label: (value, s.e.)}}`` from the stored results (higher = better)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    demo = _load(root / "damping" / "sweep.json")
    if demo:
        n = len(demo["rows"][0]["top"])
        out["demo planted top-1"] = {}
        for r in demo["rows"]:
            s = r["setting"]
            p = r["check_top1"]
            out["demo planted top-1"][f"{s['rule']} {s['value']:.3g}"] = (
                p,
                math.sqrt(max(p * (1 - p), 1.0 / n) / n),
            )
    for key, path in (
        ("MLP LDS (b)", root / "accuracy" / "exact" / "results.json"),
        ("Shakespeare LDS (a)", root / "accuracy" / "lds" / "results.json"),
    ):
        res = _load(path)
        if not res:
            continue
        table = res["table"]
        rows = {}
        for name, row in table.items():
            if not name.startswith(("ekfac_absolute", "ekfac_relative")):
                continue
            label = name.removeprefix("ekfac_")
            if "mean" in row:  # accuracy_lds: {mean, sem, n}
                rows[label] = (row["mean"], row["sem"])
            else:  # accuracy_exact: {lds, lds_sem, ...}
                rows[label] = (row["lds"], row.get("lds_sem", float("nan")))
        out[key] = rows
        per_query = res.get("per_query", {})
        if "ekfac_relative 0.1" in per_query:  # paired over queries: much less noisy
            ref = np.array(per_query["ekfac_relative 0.1"], dtype=float)
            paired = {}
            for name, v in per_query.items():
                if name.startswith(("ekfac_absolute", "ekfac_relative")):
                    d = np.array(v, dtype=float) - ref
                    d = d[~np.isnan(d)]
                    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
                    paired[name.removeprefix("ekfac_")] = (float(d.mean()), se)
            out[f"{key} Δ vs default (paired)"] = paired
    mis = _load(root / "accuracy" / "mislabel_damp" / "summary.json")
    if mis:
        rows = {}
        for label in mis["results"][0]["reports"]:
            if not label.startswith(("ekfac_absolute", "ekfac_relative")):
                continue
            aucs = np.array([r["reports"][label]["auc"] for r in mis["results"]])
            rows[label.removeprefix("ekfac_")] = (
                float(aucs.mean()),
                float(aucs.std(ddof=1) / math.sqrt(len(aucs))),
            )
        out["mislabel AUC (c)"] = rows
    smol = _load(root / "smollm2_trust" / "results.json")
    if smol:
        rows = {}
        for r in smol["sweep"]["rows"]:
            s = r["setting"]
            rows[f"{s['rule']} {s['value']:.3g}"] = (-r["self_mean_rank"], 0.0)
        out["SmolLM2 −(own rank)"] = rows
    return out


def _key(label: str) -> tuple[int, float]:
    rule, value = label.split(" ")
    return (0 if rule == "absolute" else 1, float(value))


def markdown(data: dict[str, dict[str, tuple[float, float]]]) -> str:
    benches = list(data)
    labels = sorted({lab for rows in data.values() for lab in rows}, key=_key)
    best = {b: max(v for v, _ in data[b].values()) for b in benches}
    noise = {b: data[b][max(data[b], key=lambda k: data[b][k][0])][1] for b in benches}
    lines = [
        "## Damping across benchmarks",
        "",
        "```",
        COMMAND,
        "```",
        "",
        "(after the five sweeps listed in `benchmarks/damping_summary.py`.) Value ± s.e. per "
        "benchmark (higher is better); **bold** = within 2 s.e. of that benchmark's best; the "
        "last columns count the benchmarks where the setting is within noise of the best and "
        "give its worst gap to a benchmark's best in units of that benchmark's s.e. (the "
        "minimax-regret choice has the smallest).",
        "",
        "| damping | " + " | ".join(benches) + " | within noise | worst gap (s.e.) |",
        "|---|" + "---|" * len(benches) + "---|---|",
    ]
    for lab in labels:
        cells, ok, worst = [], 0, 0.0
        for b in benches:
            if lab not in data[b]:
                cells.append("—")
                continue
            v, se = data[b][lab]
            close = best[b] - v <= 2 * max(noise[b], se if not math.isnan(se) else 0.0) + 1e-12
            ok += close
            scale = noise[b] if noise[b] > 0 and not math.isnan(noise[b]) else float("nan")
            worst = max(worst, (best[b] - v) / scale) if not math.isnan(scale) else worst
            text = f"{v:.3f} ± {se:.3f}" if se > 0 else f"{v:.3f}"
            cells.append(f"**{text}**" if close else text)
        mark = " (default)" if lab == "relative 0.1" else ""
        lines.append(
            f"| {lab}{mark} | " + " | ".join(cells) + f" | {ok}/{len(benches)} | {worst:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_docs(section: str, path: Path = Path("docs/accuracy.md")) -> None:
    """Replace (or insert before "## CI floors") the section."""
    text = path.read_text()
    head = "## Damping across benchmarks\n"
    if head in text:
        text = re.sub(
            r"## Damping across benchmarks\n.*?(?=\n## |\Z)",
            section.rstrip("\n") + "\n",
            text,
            flags=re.S,
        )
    else:
        text = text.replace("## CI floors", section + "\n## CI floors", 1)
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs", type=Path, default=Path("runs"), help="where the sweeps stored results"
    )
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    data = collect(args.runs)
    if not data:
        raise SystemExit(
            f"No stored sweep under {args.runs}: run the commands in this file's docstring."
        )
    section = markdown(data)
    print(section)
    if args.write_docs:
        write_docs(section)


if __name__ == "__main__":
    main()
