"""Exception types. Every message names the offending input and says how to fix it."""
from __future__ import annotations


class WorldStereoError(Exception):
    """Base class for errors raised by worldstereo_core."""


class InputError(WorldStereoError, ValueError):
    """Bad user input (file, tensor, parameter). The message names the input and the fix."""


class MissingWeightsError(WorldStereoError, FileNotFoundError):
    """A required weight file is missing. The message names the file, the folder and how to get it."""


class CheckpointError(WorldStereoError, ValueError):
    """A checkpoint exists but does not match the expected layout (keys, shapes, format)."""


class OutputWriteError(WorldStereoError, OSError):
    """Writing an output failed (disk full, file-size limit, not writable); no partial file is left."""


class RunFolderLocked(WorldStereoError):
    """Another run holds the output (run) folder; the message names it (pid, host, start time)."""


class ToolError(WorldStereoError, RuntimeError):
    """An external tool (HY-World 2.0 WorldMirror) failed or made nothing; the message quotes its output."""


class Interrupted(WorldStereoError):
    """Raised by a progress callback to stop long work cleanly."""
