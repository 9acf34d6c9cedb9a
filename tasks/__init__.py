"""Tasks: the Task API, the registry and the built-in tasks."""

from pathways_mm.tasks.base import GenerationConfig, MultimodalExample, Task, TaskInfo
from pathways_mm.tasks.registry import ensure_loaded, get_task, list_tasks, load_plugins, register_task

__all__ = [
    "GenerationConfig",
    "MultimodalExample",
    "Task",
    "TaskInfo",
    "ensure_loaded",
    "get_task",
    "list_tasks",
    "load_plugins",
    "register_task",
]
