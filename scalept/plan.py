"""What a stage would do for a config, read from its output files without doing it.

Every stage module exposes ``plan(cfg) -> Plan`` beside ``run(cfg)``: the Slurm planner asks it
which arrays to submit, the launcher's ``dry_run=true`` prints it, and nothing else needs to
know where another stage keeps its files (docs/architecture.md, "Files between stages").
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Plan:
    """The work items a stage has left (``todo``) out of ``total``; ``outputs`` are the files it owns."""

    step: str
    total: int
    todo: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.todo

    def lines(self, limit: int = 5) -> list[str]:
        """A summary line, then up to ``limit`` of the items left (what ``dry_run=true`` prints)."""
        state = "done" if self.done else f"{len(self.todo)} of {self.total} to do"
        head = f"{self.step}: {state}" + (f" -> {', '.join(self.outputs)}" if self.outputs else "")
        shown = [f"  {item}" for item in self.todo[:limit]]
        if len(self.todo) > limit:
            shown.append(f"  ... and {len(self.todo) - limit} more")
        return [head, *shown]
