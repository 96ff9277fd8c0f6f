"""Tasks: one registered spec per task (`tasks/base.py`), plus the objectives they share (classification,
generative). `get_task(name)` is the only way the rest of bigmodel learns what a task does."""

from bigmodel.tasks.base import TaskSpec, get_task, register_task, task_names

__all__ = ["TaskSpec", "get_task", "register_task", "task_names"]
