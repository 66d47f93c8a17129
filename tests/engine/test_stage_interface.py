"""Stage functions take one TrackedModel; nothing outside the facade reads its attributes."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from influscope.applications.unlearn import forget_gradients
from influscope.curvature.run import fit_curvature
from influscope.index.build import build_index, preconditioned_queries, query_index
from influscope.metagrad.magic import magic_scores
from influscope.modules.tracked import TrackedModel
from influscope.scoring.damping import damping_sweep
from influscope.scoring.pairwise import score_pass, self_influence_pass, token_pass
from influscope.scoring.queries import precondition_queries

SRC = Path(__file__).resolve().parents[2] / "src" / "influscope"
STAGES = [
    fit_curvature,
    precondition_queries,
    score_pass,
    self_influence_pass,
    token_pass,
    damping_sweep,
    build_index,
    preconditioned_queries,
    query_index,
    forget_gradients,
    magic_scores,
]


@pytest.mark.parametrize("stage", STAGES, ids=lambda f: f.__name__)
def test_every_stage_function_takes_a_tracked_model_first(stage) -> None:
    first, *rest = inspect.signature(stage).parameters.values()
    assert first.name == "tracked" and first.annotation in ("TrackedModel", TrackedModel)
    assert not {"model", "task", "layers"} & {p.name for p in rest}, stage.__name__


def test_no_library_module_reads_the_facades_model_task_or_layers() -> None:
    # `inf.model`, `inf.task`, `inf.layers` one by one is the triple the stages replaced:
    # pass `inf.tracked` on instead (the facade itself, analyzer.py, defines them)
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "analyzer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("model", "task", "layers")
                and isinstance(node.value, ast.Name)
                and node.value.id == "inf"
            ):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} inf.{node.attr}")
    assert not found, "read inf.tracked instead: " + ", ".join(found)
