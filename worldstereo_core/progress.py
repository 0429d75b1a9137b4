"""Progress and interruption protocol shared by the CLI (tqdm) and ComfyUI (ProgressBar).

Long-running core functions accept ``progress: ProgressFn | None`` and call it as
``progress(done, total)`` after each unit of work. The callback may raise (e.g. ``Interrupted``
or ComfyUI's own interrupt exception) to stop the work; callers clean up in ``finally`` blocks.
"""
from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[int, int], None]


def report(progress: Optional[ProgressFn], done: int, total: int) -> None:
    """Call ``progress`` if given."""
    if progress is not None:
        progress(done, total)


class TqdmProgress:
    """A ``ProgressFn`` that drives a tqdm bar (CLI use)."""

    def __init__(self, desc: str = "", unit: str = "step") -> None:
        self.desc, self.unit, self._bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or self._bar.total != total:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit)
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
