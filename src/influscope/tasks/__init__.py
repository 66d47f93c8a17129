"""Tasks: how a batch becomes a training loss and a measurement (one task per file)."""

from influscope.errors import lookup
from influscope.tasks.base import Task, loss_precision, sample_bernoulli, sample_categorical
from influscope.tasks.causal_lm import CausalLMTask, context_length
from influscope.tasks.classification import ClassificationTask
from influscope.tasks.data import EncodedDataset, example_seeds, pad_stack
from influscope.tasks.reward import RewardTask

#: Registry of built-in tasks, by name.
TASKS: dict[str, type[Task]] = {
    CausalLMTask.name: CausalLMTask,
    ClassificationTask.name: ClassificationTask,
    RewardTask.name: RewardTask,
}


def get_task(task: str | Task) -> Task:
    """A task instance from a name in :data:`TASKS` or an instance (returned as is)."""
    if isinstance(task, Task):
        return task
    return lookup(TASKS, task, "task")()


__all__ = [
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "EncodedDataset",
    "RewardTask",
    "Task",
    "context_length",
    "example_seeds",
    "get_task",
    "loss_precision",
    "pad_stack",
    "sample_bernoulli",
    "sample_categorical",
]
