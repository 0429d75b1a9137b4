"""A minimal stand-in for the ComfyUI modules the node layer imports, plus a pytest fixture.

``modules/`` holds ``folder_paths``, ``comfy.model_management``, ``comfy.utils`` and ``server``
written to the signatures of ComfyUI v0.3.64 (only what the pack uses). The V3 node schema is not
stubbed: ``comfy_api`` (and the ``comfy_execution`` / ``protocol`` modules and the
``comfy.options`` / ``comfy.cli_args`` it imports) come from the real ComfyUI checkout
(``COMFYUI_DIR``, default ``../shared/comfyui/ComfyUI``), so the pack's V3 nodes are the classes
ComfyUI itself builds; without a checkout the node tests skip (fail under
``WORLDSTEREO_REQUIRE_INTEGRATION=1``). :func:`execute` runs a node the way ComfyUI's executor
does, V1 or V3. Usage in a test module::

    from comfy_stub import comfy_stub  # noqa: F401  (pytest fixture)

    def test_something(comfy_stub):
        pack = comfy_stub.pack            # the repository imported as a ComfyUI pack
        comfy_stub.folder_paths.models_dir  # a fresh temporary ComfyUI tree per test
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from conftest import comfyui_checkout

MODULES_DIR = Path(__file__).resolve().parent / "modules"
#: Real ComfyUI modules the stub's ``comfy`` package takes over as they are (``comfy_api`` imports them).
REAL_COMFY_MODULES = ("options", "cli_args")


def _import_real_comfy_api() -> None:
    """``comfy_api.latest`` from the checkout, beside the stub (the checkout goes last on the path)."""
    if "comfy_api.latest" in sys.modules:
        return
    checkout = comfyui_checkout()
    if not (checkout / "comfy_api" / "latest" / "__init__.py").is_file():
        from conftest import integration_unavailable

        integration_unavailable(f"no ComfyUI checkout with comfy_api at {checkout} (the V3 node schema); "
                                "set COMFYUI_DIR")
    import comfy

    for name in REAL_COMFY_MODULES:
        full = f"comfy.{name}"
        if full not in sys.modules:
            spec = importlib.util.spec_from_file_location(full, checkout / "comfy" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            spec.loader.exec_module(module)
            setattr(comfy, name, module)
    if str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    importlib.import_module("comfy_api.latest")


def install() -> None:
    """Put the stub modules first on ``sys.path`` and import them, then the real ``comfy_api``
    (idempotent).

    Refuses to shadow a real ComfyUI that is already imported in this process.
    """
    existing = sys.modules.get("folder_paths")
    if existing is not None and Path(existing.__file__).resolve().parent != MODULES_DIR:
        raise RuntimeError(f"a real folder_paths is already imported from {existing.__file__}")
    if str(MODULES_DIR) not in sys.path:
        sys.path.insert(0, str(MODULES_DIR))
    for name in ("folder_paths", "comfy.model_management", "comfy.utils", "server"):
        importlib.import_module(name)
    _import_real_comfy_api()


def is_v3(cls) -> bool:
    """Whether a node class uses the V3 schema (``comfy_api.latest.io.ComfyNode``)."""
    from comfy_api.internal import _ComfyNodeInternal

    return isinstance(cls, type) and issubclass(cls, _ComfyNodeInternal)


def v1_item(item):
    """An INPUT_TYPES entry with a V3 combo (``("COMBO", {"options": [...]})``) written the V1 way."""
    if isinstance(item, tuple) and len(item) == 2 and item[0] == "COMBO" and isinstance(item[1], dict):
        return (list(item[1].get("options") or []), item[1])
    return item


def v1_input_types(cls) -> dict:
    """``cls.INPUT_TYPES()`` (V1, or the V1 view of a V3 schema) with every combo as its list of choices."""
    return {section: {name: v1_item(item) for name, item in entries.items()}
            for section, entries in cls.INPUT_TYPES().items()}


def execute(cls, hidden: dict | None = None, **inputs) -> tuple[tuple, dict | None]:
    """Run one node as ComfyUI's executor does: ``(outputs, ui)``.

    V1: ``getattr(cls(), cls.FUNCTION)(**inputs)`` (a tuple, or a dict with ``result`` / ``ui``).
    V3: ``execute`` on a clone of the class that holds the hidden inputs (``{io.Hidden.unique_id:
    "7"}``), normalised to a ``NodeOutput``; a ``ui`` object is turned into its dict.
    """
    if not is_v3(cls):
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        return (out["result"], out.get("ui")) if isinstance(out, dict) else (out, None)
    from comfy_api.internal import make_locked_method_func

    cls.VALIDATE_CLASS()
    clone = cls.PREPARE_CLASS_CLONE(hidden or {})
    out = make_locked_method_func(cls, cls.FUNCTION, clone)(**inputs)
    ui = out.ui.as_dict() if out.ui is not None and not isinstance(out.ui, dict) else out.ui
    return tuple(out.args), ui


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
