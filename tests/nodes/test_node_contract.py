"""Generic ComfyUI node-contract checks over every node in NODE_CLASS_MAPPINGS, V1 and V3.

``contract_errors`` lists every violation of the V1 contract (as read in ComfyUI v0.3.64), or for a
V3 node (``comfy_api.latest.io.ComfyNode``) of its schema and of the V1 view ComfyUI derives from
it, and of our own conventions (prefixed ids, ``WorldStereo/`` categories, display names; V3: a
tooltip on every input, socket types of our own prefixed ``WORLDSTEREO_``). ``interface_errors``
compares a node with the interface saved workflows refer to (``tests/node_interface.json``: ids,
input names in order, outputs). Both are proven able to fail on deliberately broken nodes below.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
from comfy_stub import comfy_stub  # noqa: F401  (pytest fixture)
from conftest import REPO, TESTS, import_pack

import comfy_stub as stub_module
from comfy_stub import v1_item

stub_module.install()
from comfy_api.internal import first_real_override  # noqa: E402
from comfy_api.latest import io  # noqa: E402  (the real V3 schema, from the ComfyUI checkout)

PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
#: ComfyUI's own socket types our nodes use.
CORE_TYPES = {"IMAGE", "MASK", "LATENT", "MODEL", "VAE", "CLIP", "CLIP_VISION", "CONDITIONING", "VIDEO", "SIGMAS",
              "SAMPLER", "COMBO"}
#: Socket types of ours named before the V3 prefix rule: saved workflows' links carry them, so they stay.
LEGACY_TYPES = {"MOGE_MODEL", "DINOV2_MODEL", "POINT_CLOUD", "CAMERA_TRAJECTORY", "MEMORY_BANK"}
OWN_TYPE_PREFIX = "WORLDSTEREO_"
V1_HOOKS = ("VALIDATE_INPUTS", "IS_CHANGED")
INTERFACE = TESTS / "node_interface.json"
HIDDEN = {"UNIQUE_ID", "PROMPT", "EXTRA_PNGINFO", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG"}
SECTIONS = {"required", "optional", "hidden"}
ID_PREFIX = "WorldStereo"
CATEGORY_PREFIX = "WorldStereo"
TYPE_NAME = re.compile(r"^[A-Z0-9_]+$|^\*$")



def _input_errors(section: str, name: str, spec) -> list[str]:
    where = f"{section}.{name}"
    if section == "hidden":
        return [] if spec in HIDDEN or (isinstance(spec, tuple) and spec and spec[0] in HIDDEN) else [
            f"{where}: hidden input must be one of {sorted(HIDDEN)}"]
    if not isinstance(spec, (tuple, list)) or not 1 <= len(spec) <= 2:
        return [f"{where}: spec must be a tuple (TYPE,) or (TYPE, options)"]
    kind, options = spec[0], (spec[1] if len(spec) == 2 else {})
    errors = []
    if not isinstance(options, dict):
        return [f"{where}: options must be a dict"]
    if "tooltip" in options and not isinstance(options["tooltip"], str):
        errors.append(f"{where}: tooltip must be a string")
    if isinstance(kind, (list, tuple)):
        if not kind or not all(isinstance(c, (str, int, float)) for c in kind):
            errors.append(f"{where}: combo choices must be a non-empty list of str/int/float")
        elif "default" in options and options["default"] not in kind:
            errors.append(f"{where}: combo default {options['default']!r} is not a choice")
        return errors
    if not isinstance(kind, str) or not TYPE_NAME.match(kind):
        return errors + [f"{where}: type must be an upper-case type name or a combo list, got {kind!r}"]
    if kind in ("INT", "FLOAT") and "default" in options:
        lo, hi, default = options.get("min"), options.get("max"), options["default"]
        if not isinstance(default, (int, float)) or isinstance(default, bool):
            errors.append(f"{where}: {kind} default must be a number")
        elif (lo is not None and default < lo) or (hi is not None and default > hi):
            errors.append(f"{where}: default {default} outside [{lo}, {hi}]")
        if kind == "INT" and not isinstance(default, int):
            errors.append(f"{where}: INT default must be an int")
    if kind == "BOOLEAN" and "default" in options and not isinstance(options["default"], bool):
        errors.append(f"{where}: BOOLEAN default must be a bool")
    if kind == "STRING" and "default" in options and not isinstance(options["default"], str):
        errors.append(f"{where}: STRING default must be a string")
    return errors


def _is_classmethod(cls, name: str) -> bool:
    return isinstance(inspect.getattr_static(cls, name, None), classmethod)


def _parameter_errors(func, name: str, inputs: list[str], optional: list[str]) -> list[str]:
    """``func`` (a node's execute function) accepts every input, has defaults for the optional
    ones and requires nothing else."""
    errors = []
    params = inspect.signature(func).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for inp in inputs:
        if inp not in params and not var_kw:
            errors.append(f"{name}() does not accept input {inp!r}")
    for inp in optional:
        if inp in params and params[inp].default is inspect.Parameter.empty:
            errors.append(f"{name}(): optional input {inp!r} needs a default")
    for pname, p in params.items():
        if pname in ("self", "cls") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if pname not in inputs and p.default is inspect.Parameter.empty:
            errors.append(f"{name}() requires {pname!r}, which is not a declared input")
    return errors


def _common_errors(node_id: str, cls, display_names: dict) -> list[str]:
    errors: list[str] = []
    if not node_id.startswith(ID_PREFIX):
        errors.append(f"node id must start with {ID_PREFIX!r}")
    if not isinstance(display_names.get(node_id), str) or not display_names.get(node_id):
        errors.append("missing NODE_DISPLAY_NAME_MAPPINGS entry")
    try:
        category = getattr(cls, "CATEGORY", None)
    except Exception as err:  # a V3 class computes it from its schema
        category = f"<{err!r}>"
    if not isinstance(category, str) or not category.startswith(CATEGORY_PREFIX):
        errors.append(f"CATEGORY must start with {CATEGORY_PREFIX!r}, got {category!r}")
    return errors


def _type_errors(where: str, io_type) -> list[str]:
    if isinstance(io_type, list) or io_type in PRIMITIVES or io_type in CORE_TYPES or io_type in LEGACY_TYPES:
        return []
    if not (isinstance(io_type, str) and io_type.startswith(OWN_TYPE_PREFIX) and TYPE_NAME.match(io_type)):
        return [f"{where}: socket type {io_type!r} is neither ComfyUI's nor prefixed {OWN_TYPE_PREFIX!r}"]
    return []


def v3_contract_errors(node_id: str, cls, display_names: dict) -> list[str]:
    """Contract violations of one V3 node class: its schema, and the V1 view ComfyUI serves from it."""
    errors = _common_errors(node_id, cls, display_names)
    try:
        schema = cls.GET_SCHEMA()
        spec = cls.INPUT_TYPES()
    except Exception as err:  # the checker reports, it does not crash
        return errors + [f"schema: {err!r}"]
    if schema.node_id != node_id:
        errors.append(f"schema node_id {schema.node_id!r} differs from the mapping key")
    if schema.display_name != display_names.get(node_id):
        errors.append(f"schema display_name {schema.display_name!r} differs from NODE_DISPLAY_NAME_MAPPINGS")
    if not schema.description:
        errors.append("schema has no description")
    for hook in V1_HOOKS:
        if hasattr(cls, hook):
            errors.append(f"{hook} is a V1 hook that ComfyUI ignores on a V3 node (validate_inputs / "
                          "fingerprint_inputs)")
    inputs = schema.inputs or []
    for inp in inputs:
        if not isinstance(inp.tooltip, str) or not inp.tooltip.strip():
            errors.append(f"input {inp.id!r} has no tooltip")
        errors += _type_errors(f"input {inp.id!r}", inp.get_io_type())
    for section in ("required", "optional"):
        for name, item in spec.get(section, {}).items():
            errors += _input_errors(section, name, v1_item(item))
    names = [o.display_name for o in schema.outputs or []]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        errors.append(f"every output needs its own display_name (the name saved workflows show), got {names}")
    for out in schema.outputs or []:
        errors += _type_errors(f"output {out.display_name!r}", out.io_type)
    if not (schema.outputs or schema.is_output_node):
        errors.append("a node without outputs must set is_output_node=True")
    ids = [i.id for i in inputs]
    errors += _parameter_errors(cls.execute, "execute", ids, [i.id for i in inputs if i.optional])
    for hook in ("validate_inputs", "fingerprint_inputs"):
        if first_real_override(cls, hook) is not None:
            params = inspect.signature(getattr(cls, hook)).parameters
            unknown = [p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)
                       and p not in ids and p != "input_types"]
            if unknown:
                errors.append(f"{hook}() takes {unknown}, which are not inputs")
    if hasattr(cls, "preview_trajectory") and not _is_classmethod(cls, "preview_trajectory"):
        errors.append("preview_trajectory must be a classmethod")
    return errors


def contract_errors(node_id: str, cls, display_names: dict) -> list[str]:
    """Every contract violation of one node class (empty list = conforming)."""
    if stub_module.is_v3(cls):
        return v3_contract_errors(node_id, cls, display_names)
    errors = _common_errors(node_id, cls, display_names)

    if not _is_classmethod(cls, "INPUT_TYPES"):
        return errors + ["INPUT_TYPES must be a classmethod"]
    try:
        spec = cls.INPUT_TYPES()
    except Exception as err:  # the checker reports, it does not crash
        return errors + [f"INPUT_TYPES() raised {err!r}"]
    if not isinstance(spec, dict) or "required" not in spec or set(spec) - SECTIONS:
        return errors + [f"INPUT_TYPES() must be a dict with 'required' and only {sorted(SECTIONS)}"]
    names: list[str] = []
    for section in ("required", "optional", "hidden"):
        entries = spec.get(section, {})
        if not isinstance(entries, dict):
            errors.append(f"INPUT_TYPES()[{section!r}] must be a dict")
            continue
        for name, item in entries.items():
            if not isinstance(name, str) or not name.isidentifier():
                errors.append(f"{section}: input name {name!r} is not an identifier")
            if name in names:
                errors.append(f"{section}.{name}: input declared twice")
            names.append(name)
            errors += _input_errors(section, name, item)

    returns = getattr(cls, "RETURN_TYPES", None)
    if not isinstance(returns, tuple) or not all(
        (isinstance(t, str) and TYPE_NAME.match(t)) or isinstance(t, list) for t in returns
    ):
        errors.append(f"RETURN_TYPES must be a tuple of type names, got {returns!r}")
        returns = ()
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS", "OUTPUT_IS_LIST"):
        value = getattr(cls, attr, None)
        if value is not None and (not isinstance(value, tuple) or len(value) != len(returns)):
            errors.append(f"{attr} must be a tuple as long as RETURN_TYPES ({len(returns)})")
    if not returns and not getattr(cls, "OUTPUT_NODE", False):
        errors.append("a node without outputs must set OUTPUT_NODE = True")
    for attr in ("OUTPUT_NODE", "INPUT_IS_LIST", "NOT_IDEMPOTENT", "DEPRECATED", "EXPERIMENTAL"):
        if hasattr(cls, attr) and not isinstance(getattr(cls, attr), bool):
            errors.append(f"{attr} must be a bool")
    if hasattr(cls, "DESCRIPTION") and not isinstance(cls.DESCRIPTION, str):
        errors.append("DESCRIPTION must be a string")

    func_name = getattr(cls, "FUNCTION", None)
    func = getattr(cls, func_name, None) if isinstance(func_name, str) else None
    if not callable(func):
        errors.append(f"FUNCTION {func_name!r} does not name a method")
    else:
        errors += _parameter_errors(func, func_name, names, list(spec.get("optional", {})))
    for hook in ("VALIDATE_INPUTS", "IS_CHANGED", "preview_trajectory"):
        if hasattr(cls, hook) and not _is_classmethod(cls, hook):
            errors.append(f"{hook} must be a classmethod")
    return errors


# --- the checker must be able to fail ------------------------------------------------------

class _GoodNode:
    CATEGORY = "WorldStereo/test"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"image": ("IMAGE",), "steps": ("INT", {"default": 4, "min": 1, "max": 50}),
                         "mode": (["a", "b"], {"default": "a"})},
            "optional": {"strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, steps):
        return True

    def run(self, image, steps, mode, strength=1.0, unique_id=None):
        return (image, None)


def _broken(**overrides):
    return type("Broken", (_GoodNode,), overrides)


def _inputs(**spec):
    return classmethod(lambda cls: spec)


BROKEN_NODES = {
    "wrong id prefix": ("SomeNode", _GoodNode),
    "category": ("WorldStereoX", _broken(CATEGORY="image")),
    "INPUT_TYPES not classmethod": ("WorldStereoX", _broken(INPUT_TYPES=lambda self: {})),
    "no required section": ("WorldStereoX", _broken(INPUT_TYPES=_inputs(optional={}))),
    "unknown section": ("WorldStereoX", _broken(INPUT_TYPES=_inputs(required={}, extra={}))),
    "bad type name": ("WorldStereoX", _broken(INPUT_TYPES=_inputs(required={"x": ("image",)}))),
    "combo default": ("WorldStereoX", _broken(INPUT_TYPES=_inputs(required={"m": (["a"], {"default": "z"})}))),
    "int default range": ("WorldStereoX", _broken(INPUT_TYPES=_inputs(required={"n": ("INT", {"default": 9, "max": 3})}))),
    "bad hidden": ("WorldStereoX", _broken(INPUT_TYPES=_inputs(required={}, hidden={"h": "NOPE"}))),
    "RETURN_NAMES length": ("WorldStereoX", _broken(RETURN_NAMES=("only_one",))),
    "RETURN_TYPES not tuple": ("WorldStereoX", _broken(RETURN_TYPES=["IMAGE"])),
    "FUNCTION missing": ("WorldStereoX", _broken(FUNCTION="nope")),
    "function misses an input": ("WorldStereoX", _broken(run=lambda self, image, steps: None)),
    "optional without default": ("WorldStereoX", _broken(run=lambda self, image, steps, mode, strength: None)),
    "undeclared required param": ("WorldStereoX", _broken(run=lambda self, image, steps, mode, extra, strength=1.0: None)),
    "sink without OUTPUT_NODE": ("WorldStereoX", _broken(RETURN_TYPES=(), RETURN_NAMES=())),
    "VALIDATE_INPUTS not classmethod": ("WorldStereoX", _broken(VALIDATE_INPUTS=lambda self: True)),
    "no display name": ("WorldStereoNoName", _GoodNode),
}


def test_checker_accepts_a_conforming_node():
    assert contract_errors("WorldStereoGood", _GoodNode, {"WorldStereoGood": "Good"}) == []


@pytest.mark.parametrize("case", sorted(BROKEN_NODES))
def test_checker_rejects_broken_node(case):
    node_id, cls = BROKEN_NODES[case]
    names = {"SomeNode": "Some", "WorldStereoX": "X"}
    assert contract_errors(node_id, cls, names), f"checker missed: {case}"


def _v3_node(inputs=None, outputs=None, node_id="WorldStereoGoodV3", execute=None, **attrs):
    """A V3 node class; by default a conforming one."""
    scene = io.Custom("WORLDSTEREO_TEST_SCENE")
    inputs = inputs if inputs is not None else [
        io.Image.Input("image", tooltip="The image."),
        io.Combo.Input("mode", options=["a", "b"], default="a", tooltip="A mode."),
        io.Int.Input("seed", default=4, min=0, max=9, control_after_generate=True, tooltip="The seed."),
        io.Float.Input("strength", default=1.0, min=0.0, max=2.0, optional=True, tooltip="How much."),
    ]
    outputs = outputs if outputs is not None else [scene.Output(display_name="scene", tooltip="The scene.")]

    def define_schema(cls):
        return io.Schema(node_id=node_id, display_name="Good V3", category="WorldStereo/test",
                         description="A test node.", inputs=inputs, outputs=outputs)

    def default_execute(cls, image, mode, seed, strength=1.0):
        return io.NodeOutput(image)

    body = {"define_schema": classmethod(define_schema), "execute": classmethod(execute or default_execute), **attrs}
    return type("V3Node", (io.ComfyNode,), body)


BROKEN_V3_NODES = {
    "input without tooltip": lambda: _v3_node(inputs=[io.Image.Input("image")],
                                              execute=lambda cls, image: io.NodeOutput(image)),
    "unprefixed own type": lambda: _v3_node(outputs=[io.Custom("SCENE_THING").Output(display_name="scene")]),
    "output without display_name": lambda: _v3_node(outputs=[io.Image.Output()]),
    "schema id differs": lambda: _v3_node(node_id="WorldStereoOther"),
    "execute misses an input": lambda: _v3_node(execute=lambda cls, image, mode, strength=1.0: None),
    "optional without default": lambda: _v3_node(execute=lambda cls, image, mode, seed, strength: None),
    "V1 hook on a V3 node": lambda: _v3_node(VALIDATE_INPUTS=classmethod(lambda cls, mode: True)),
    "validate_inputs of no input": lambda: _v3_node(validate_inputs=classmethod(lambda cls, nope: True)),
    "combo default": lambda: _v3_node(inputs=[io.Combo.Input("m", options=["a"], default="z", tooltip="m")],
                                      execute=lambda cls, m: None),
}


def test_v3_checker_accepts_a_conforming_node():
    node = _v3_node()
    assert contract_errors("WorldStereoGoodV3", node, {"WorldStereoGoodV3": "Good V3"}) == []
    out, _ui = stub_module.execute(node, image="x", mode="a", seed=1)
    assert out == ("x",)


@pytest.mark.parametrize("case", sorted(BROKEN_V3_NODES))
def test_v3_checker_rejects_broken_node(case):
    node = BROKEN_V3_NODES[case]()
    assert contract_errors("WorldStereoGoodV3", node, {"WorldStereoGoodV3": "Good V3"}), f"checker missed: {case}"


# --- the interface saved workflows refer to ------------------------------------------------

def node_interface(cls) -> dict:
    """Input names in order (required, optional) and output names of a V1 or V3 node."""
    spec = cls.INPUT_TYPES()
    return {"required": list(spec.get("required", {})), "optional": list(spec.get("optional", {})),
            "outputs": list(cls.RETURN_NAMES or cls.RETURN_TYPES)}


def interface_errors(saved: dict, mappings: dict) -> list[str]:
    """Nodes of ``saved`` (id -> interface) that are gone or changed; new inputs may only be
    appended as optional ones."""
    errors = []
    for node_id, want in saved.items():
        cls = mappings.get(node_id)
        if cls is None:
            errors.append(f"{node_id}: node id removed")
            continue
        have = node_interface(cls)
        if have["required"] != want["required"]:
            errors.append(f"{node_id}: required inputs {have['required']} instead of {want['required']}")
        if have["optional"][:len(want["optional"])] != want["optional"]:
            errors.append(f"{node_id}: optional inputs {have['optional']} do not start with {want['optional']}")
        if have["outputs"] != want["outputs"]:
            errors.append(f"{node_id}: outputs {have['outputs']} instead of {want['outputs']}")
    return errors


def _saved_interface() -> dict:
    return json.loads(INTERFACE.read_text(encoding="utf-8"))["nodes"]


def _retired() -> dict:
    """Node ids that left the node set on purpose -> the reason and what replaces them."""
    return json.loads(INTERFACE.read_text(encoding="utf-8"))["retired"]


def test_nodes_keep_the_saved_interface(comfy_stub):
    saved = _saved_interface()
    assert len(saved) >= 21
    errors = interface_errors(saved, comfy_stub.pack.NODE_CLASS_MAPPINGS)
    assert errors == [], "\n".join(errors)


def test_retired_nodes_are_gone_and_only_those(comfy_stub):
    """Removal is explicit: a retired id (with its reason) is no longer registered, and no other
    saved id is missing (test_nodes_keep_the_saved_interface)."""
    retired, saved = _retired(), _saved_interface()
    assert retired and all(isinstance(reason, str) and reason for reason in retired.values())
    assert not retired.keys() & saved.keys()
    assert not retired.keys() & comfy_stub.pack.NODE_CLASS_MAPPINGS.keys()


def test_interface_checker_can_fail(comfy_stub):
    mappings = comfy_stub.pack.NODE_CLASS_MAPPINGS
    saved = _saved_interface()
    node_id = next(n for n, i in saved.items() if len(i["required"]) >= 2 and i["optional"])
    changes = {
        "renamed input": {**saved[node_id], "required": ["x"] + saved[node_id]["required"][1:]},
        "reordered inputs": {**saved[node_id], "required": saved[node_id]["required"][::-1]},
        "optional before": {**saved[node_id], "optional": ["new"] + saved[node_id]["optional"]},
        "required added": {**saved[node_id], "required": saved[node_id]["required"][:-1]},
        "output renamed": {**saved[node_id], "outputs": ["other"]},
    }
    for case, want in changes.items():
        assert interface_errors({node_id: want}, mappings), f"checker missed: {case}"
    assert interface_errors({"WorldStereoRemoved": saved[node_id]}, mappings)


# --- the pack's real nodes -----------------------------------------------------------------

def _pack_nodes() -> list[str]:
    stub_module.install()
    return sorted(import_pack().NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("node_id", _pack_nodes())
def test_node_contract(comfy_stub, node_id):
    pack = comfy_stub.pack
    errors = contract_errors(node_id, pack.NODE_CLASS_MAPPINGS[node_id], pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert errors == [], f"{node_id}: " + "; ".join(errors)


def test_mappings_are_consistent(comfy_stub):
    pack = comfy_stub.pack
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict) and isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) <= set(pack.NODE_CLASS_MAPPINGS)
    assert all(inspect.isclass(c) for c in pack.NODE_CLASS_MAPPINGS.values())
    assert pack.WEB_DIRECTORY == "./web" and (REPO / "web").is_dir()


def _js_list(name: str) -> list[str]:
    source = (REPO / "web" / "trajectory_preview.js").read_text(encoding="utf-8")
    block = re.search(rf"const {name} = \[(.*?)\];", source, re.S)
    assert block, f"{name} constant not found in web/trajectory_preview.js"
    return re.findall(r'"([^"]+)"', block.group(1))


def test_preview_nodes_and_js_list_agree(comfy_stub):
    """Every node serving live previews is listed in the JS, and every listed id that exists
    serves them (ids not written yet are allowed), except the executed-only ones, which are listed
    too and serve none (their trajectories exist only after they ran)."""
    mappings = comfy_stub.pack.NODE_CLASS_MAPPINGS
    listed, executed_only = _js_list("TRAJECTORY_NODE_TYPES"), set(_js_list("EXECUTED_ONLY_NODE_TYPES"))
    assert listed and all(t.startswith(ID_PREFIX) for t in listed) and executed_only <= set(listed)
    serving = {nid for nid, cls in mappings.items() if hasattr(cls, "preview_trajectory")}
    assert serving <= set(listed), f"add {sorted(serving - set(listed))} to TRAJECTORY_NODE_TYPES"
    assert not serving & executed_only, f"{sorted(serving & executed_only)} serve live previews: not executed-only"
    missing = [t for t in listed if t in mappings and t not in serving | executed_only]
    assert not missing, f"{missing} are listed for preview but have no preview_trajectory classmethod"


def test_web_folder_holds_only_extensions():
    """Every .js under web/ is auto-loaded by the frontend; each must register an extension
    with a worldstereo.* name and import the app only through the relative scripts path."""
    files = sorted(Path(REPO, "web").rglob("*.js"))
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "app.registerExtension(" in text, path
        assert re.search(r'name:\s*"worldstereo\.[A-Za-z]+"', text), path
        assert 'from "../../scripts/app.js"' in text, path
        assert "/extensions/" not in text, f"{path}: do not hard-code the pack's URL"


# --- example workflows and their API twins ---------------------------------------------------

WORKFLOWS = REPO / "example_workflows"
API_PROMPTS = TESTS / "api_prompts"
#: Core ComfyUI nodes the examples use, with the frontend's widget names (None = frontend-only widget).
CORE_WIDGETS = {"LoadImage": ["image", None], "PreviewImage": [], "Preview3D": ["model_file", "image"],
                "UNETLoader": ["unet_name", "weight_dtype"], "CLIPLoader": ["clip_name", "type", "device"],
                "VAELoader": ["vae_name"], "CLIPVisionLoader": ["clip_name"], "CLIPTextEncode": ["text"],
                "RandomNoise": ["noise_seed", "control_after_generate"], "CFGGuider": ["cfg"],
                "KSamplerSelect": ["sampler_name"], "SamplerCustomAdvanced": [], "CreateVideo": ["fps"],
                "SaveVideo": ["filename_prefix", "format", "codec"]}
#: Widgets of the native nodes, which need ComfyUI's model code and so are absent from the stub (their
#: definitions are checked against the shipped workflows in the real frontend: export_workflows.py).
CORE_WIDGETS.update({"WorldStereoApplyVariant": ["variant", "attention_scope"], "WorldStereoConditioning": [],
                     "WorldStereoReleaseSigmas": ["steps", "shift"], "WorldStereoDMDSigmas": [],
                     "WorldStereoReleaseUniPCSampler": ["solver_order"], "WorldStereoVAEDecodeKeyframes": ["fps"]})
#: Frontend-only widget added after an INT input named like this.
SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def _workflows() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json")) if WORKFLOWS.is_dir() else []


def _widget_specs(cls) -> list[tuple[str, object]]:
    """(name, spec) of every widget the frontend creates for a V1 node, in order; the seed's
    control_after_generate widget is ("control_after_generate", None)."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, item in spec.get(section, {}).items():
            item = v1_item(item)
            kind, options = item[0], (item[1] if len(item) > 1 else {})
            if options.get("forceInput") or not (isinstance(kind, list) or kind in PRIMITIVES):
                continue
            out.append((name, item))
            if kind == "INT" and (name in SEED_NAMES or options.get("control_after_generate")):
                out.append(("control_after_generate", None))
    return out


def _value_errors(cls, name, item, value) -> list[str]:
    kind, options = item[0], (item[1] if len(item) > 1 else {})
    if isinstance(kind, list):
        if value in kind:
            return []
        validate = (first_real_override(cls, "validate_inputs") if stub_module.is_v3(cls)
                    else getattr(cls, "VALIDATE_INPUTS", None))
        exempt = validate is not None and name in inspect.signature(validate).parameters
        return [] if exempt and isinstance(value, str) else [f"{name}: {value!r} is not a choice"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{name}: {value!r} is not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{name}: {value!r} is not a string"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
        return [f"{name}: {value!r} is not a number of type {kind}"]
    lo, hi = options.get("min"), options.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return [f"{name}: {value} outside [{lo}, {hi}]"]
    return []


def workflow_errors(workflow: dict, mappings: dict) -> list[str]:
    """Node types unknown to the pack (or to the core list above) and widget values that do not fit
    the node's INPUT_TYPES (count, order, types, ranges, combo choices)."""
    errors = []
    for node in workflow.get("nodes", []):
        where = f"node {node['id']} ({node['type']})"
        values = node.get("widgets_values") or []
        if node["type"] in CORE_WIDGETS:
            if len(values) != len(CORE_WIDGETS[node["type"]]):
                errors.append(f"{where}: {len(values)} widget values for {CORE_WIDGETS[node['type']]}")
            continue
        cls = mappings.get(node["type"])
        if cls is None:
            errors.append(f"{where}: unknown node type")
            continue
        specs = _widget_specs(cls)
        if len(values) != len(specs):
            errors.append(f"{where}: {len(values)} widget values for widgets {[n for n, _ in specs]}")
            continue
        for (name, item), value in zip(specs, values):
            if item is None:
                errors += [] if value in CONTROL_VALUES else [f"{where}: control_after_generate {value!r}"]
            else:
                errors += [f"{where}: {e}" for e in _value_errors(cls, name, item, value)]
    return errors


def twin_errors(workflow: dict, api: dict) -> list[str]:
    """Differences between a UI workflow and its API twin: node ids and types, widget values by
    name, and every link as ``[source id, output slot]``."""
    errors = []
    nodes = {str(n["id"]): n for n in workflow["nodes"] if n.get("mode", 0) == 0}
    if set(nodes) != set(api):
        return [f"node ids differ: UI {sorted(nodes)} vs API {sorted(api)}"]
    links = {link[0]: link for link in workflow.get("links", [])}
    pack = import_pack()
    for nid, node in nodes.items():
        entry = api[nid]
        if entry["class_type"] != node["type"]:
            errors.append(f"node {nid}: class_type {entry['class_type']} vs {node['type']}")
            continue
        cls = pack.NODE_CLASS_MAPPINGS.get(node["type"])
        names = ([n for n, _ in _widget_specs(cls)] if cls is not None else CORE_WIDGETS[node["type"]])
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, value in zip(names, node.get("widgets_values") or []):
            if name in (None, "control_after_generate") or name in linked:
                continue
            if entry["inputs"].get(name) != value:
                errors.append(f"node {nid}: {name} = {entry['inputs'].get(name)!r} in the API, {value!r} in the UI")
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            _lid, src, slot, _dst, _dslot, _type = links[inp["link"]]
            if entry["inputs"].get(inp["name"]) != [str(src), slot]:
                errors.append(f"node {nid}: input {inp['name']} = {entry['inputs'].get(inp['name'])} vs link "
                              f"[{src}, {slot}]")
    return errors


def test_every_use_case_has_a_workflow_thumbnail_and_twin():
    names = {p.stem for p in _workflows()}
    assert len(names) >= 4, names
    for name in names:
        thumb = WORKFLOWS / f"{name}.jpg"
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"
        assert (API_PROMPTS / f"{name}.api.json").is_file(), f"no API twin for {name}"


@pytest.mark.parametrize("path", _workflows(), ids=lambda p: p.name)
def test_example_workflow_matches_node_definitions(comfy_stub, path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    errors = workflow_errors(workflow, comfy_stub.pack.NODE_CLASS_MAPPINGS)
    assert errors == [], "\n".join(errors)
    twin = json.loads((API_PROMPTS / f"{path.stem}.api.json").read_text(encoding="utf-8"))
    errors = twin_errors(workflow, twin)
    assert errors == [], "\n".join(errors)


def test_workflow_checkers_can_fail(comfy_stub):
    path = _workflows()[0]
    workflow = json.loads(path.read_text(encoding="utf-8"))
    twin = json.loads((API_PROMPTS / f"{path.stem}.api.json").read_text(encoding="utf-8"))
    mappings = comfy_stub.pack.NODE_CLASS_MAPPINGS
    ours = next(n for n in workflow["nodes"] if n["type"] in mappings and n.get("widgets_values"))
    shifted = json.loads(json.dumps(workflow))
    node = next(n for n in shifted["nodes"] if n["id"] == ours["id"])
    node["widgets_values"] = node["widgets_values"][1:]  # a removed widget shifts every value
    assert workflow_errors(shifted, mappings)
    unknown = json.loads(json.dumps(workflow))
    unknown["nodes"][0]["type"] = "WorldStereoNoSuchNode"
    assert workflow_errors(unknown, mappings)
    other = json.loads(json.dumps(twin))
    entry = other[str(ours["id"])]
    first = next(k for k, v in entry["inputs"].items() if not isinstance(v, list))
    entry["inputs"][first] = "changed"
    assert twin_errors(workflow, other)


def _error_prefix(cls) -> str | None:
    """The node name ``node_errors`` puts in front of the errors of ``cls.execute`` (None: not wrapped)."""
    import contextlib

    func = inspect.getattr_static(cls, "execute").__func__
    for cell in func.__closure__ or ():
        cm = cell.cell_contents
        if isinstance(cm, contextlib._GeneratorContextManager) and cm.func.__name__ == "node_errors":
            return cm.args[0]
    return None


@pytest.mark.parametrize("node_id", _pack_nodes())
def test_error_prefix_is_the_display_name(comfy_stub, node_id):
    pack = comfy_stub.pack
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert _error_prefix(cls) in (None, pack.NODE_DISPLAY_NAME_MAPPINGS[node_id])


def test_error_prefix_check_can_fail(comfy_stub):
    node_errors = importlib.import_module(f"{comfy_stub.pack.__name__}.nodes._comfy").node_errors

    class Misnamed(io.ComfyNode):
        @classmethod
        @node_errors("WorldStereo Old Name")
        def execute(cls):
            return None

    assert _error_prefix(Misnamed) == "WorldStereo Old Name"
