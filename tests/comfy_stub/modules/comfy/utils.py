"""Stand-in for ``comfy.utils.ProgressBar`` and its global hook, for unit tests.

Without a hook set, :class:`ProgressBar` behaves like the real one with no server (it only
records). :func:`install_recording_hook` (stub only) installs a hook that checks the interrupt flag
first, as the hook of ComfyUI's ``main.py`` does, and records ``(value, total, node_id)``.
"""
from __future__ import annotations

from . import model_management

PROGRESS_BAR_HOOK = None
#: (value, total, node_id) seen by the recording hook (stub only).
updates: list[tuple[int, int, object]] = []


def set_progress_bar_global_hook(function) -> None:
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


def install_recording_hook() -> None:
    """Stub only: clear :data:`updates` and install a hook like main.py's (interrupt check first)."""
    updates.clear()

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        model_management.throw_exception_if_processing_interrupted()
        updates.append((value, total, node_id))

    set_progress_bar_global_hook(hook)


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        value = min(value, self.total)
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)
