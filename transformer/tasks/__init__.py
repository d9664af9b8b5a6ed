"""Tasks by name (--task): each one a `base.Task`; see base.py for the interface.

    task = tasks.get(cfg.data.task)
    examples = task.get_split(cfg.data, "validation", data_dir)

A new task is a module here with a `base.Task` subclass, added to `TASKS`.
"""

from __future__ import annotations

from transformer.config import ConfigError
from transformer.tasks import base, parsing, translation

TASKS: dict[str, base.Task] = {t.name: t for t in (translation.Translation(), parsing.Parsing())}


def get(name: str) -> base.Task:
  """The task called `name` ('translation', 'parsing')."""
  if name not in TASKS:
    raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
  return TASKS[name]
