"""Tasks and prompts: ``load_task_rows`` (registry, local files or HF hub), ``build_prompts`` (templates)."""

from rl_small.data.registry import TASKS, LoadStats, Task, build_prompts, load_task_rows, register_task
from rl_small.data.templates import TEMPLATES, render_prompt

__all__ = ["TASKS", "TEMPLATES", "LoadStats", "Task", "build_prompts", "load_task_rows", "register_task", "render_prompt"]
