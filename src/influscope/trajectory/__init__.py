"""Trajectory-aware attribution over a run's checkpoints: SOURCE and TracIn-CP."""

from influscope.trajectory.checkpoints import (
    Trajectory,
    TrajectoryCheckpoint,
    check_same_architecture,
    from_directory,
    from_models,
    from_train_result,
    load_trajectory,
)
from influscope.trajectory.source import (
    Segment,
    make_segments,
    segment_filters,
    source_queries,
    source_scores,
    tracin_scores,
)

__all__ = [
    "Segment",
    "Trajectory",
    "TrajectoryCheckpoint",
    "check_same_architecture",
    "from_directory",
    "from_models",
    "from_train_result",
    "load_trajectory",
    "make_segments",
    "segment_filters",
    "source_queries",
    "source_scores",
    "tracin_scores",
]
