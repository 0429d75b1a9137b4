"""A minimal stand-in for the ComfyUI modules the node layer imports, plus a pytest fixture.

``modules/`` holds ``folder_paths``, ``comfy.model_management``, ``comfy.utils`` and ``server``
written to the signatures of ComfyUI v0.3.64 (only what the pack uses). Usage in a test module::

    from comfy_stub import comfy_stub  # noqa: F401  (pytest fixture)

    def test_something(comfy_stub):
        pack = comfy_stub.pack            # the repository imported as a ComfyUI pack
        comfy_stub.folder_paths.models_dir  # a fresh temporary ComfyUI tree per test
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

MODULES_DIR = Path(__file__).resolve().parent / "modules"


def install() -> None:
    """Put the stub modules first on ``sys.path`` and import them (idempotent).

    Refuses to shadow a real ComfyUI that is already imported in this process.
    """
    existing = sys.modules.get("folder_paths")
    if existing is not None and Path(existing.__file__).resolve().parent != MODULES_DIR:
        raise RuntimeError(f"a real folder_paths is already imported from {existing.__file__}")
    if str(MODULES_DIR) not in sys.path:
        sys.path.insert(0, str(MODULES_DIR))
    for name in ("folder_paths", "comfy.model_management", "comfy.utils", "server"):
        importlib.import_module(name)


@dataclass
class ComfyStub:
    folder_paths: ModuleType
    model_management: ModuleType
    utils: ModuleType
    server: ModuleType
    pack: ModuleType

    def interrupt(self) -> None:
        """Set the interrupt flag, as ``POST /interrupt`` does."""
        self.model_management.interrupt_current_processing(True)


@pytest.fixture
def comfy_stub(tmp_path) -> ComfyStub:
    """Stub ComfyUI rooted in ``tmp_path`` with the pack imported and its folders registered."""
    install()
    import folder_paths
    import server
    from comfy import model_management, utils

    from conftest import import_pack

    folder_paths.reset(str(tmp_path / "comfyui"))
    model_management.calls.clear()
    model_management.interrupt_current_processing(False)
    utils.install_recording_hook()
    pack = import_pack()
    pack.nodes.register_with_comfy()
    yield ComfyStub(folder_paths, model_management, utils, server, pack)
    model_management.interrupt_current_processing(False)
    utils.set_progress_bar_global_hook(None)
