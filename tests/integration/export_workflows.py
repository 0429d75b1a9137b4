"""Build the example workflows in the real ComfyUI frontend, and check them.

The graphs are described below (node type, widget values by name, links by input/output name).
``--write`` builds each one in headless Chromium on a headless ComfyUI with this pack, then saves
what the browser itself produces: the UI workflow (``example_workflows/<name>.json``, as "Save"
writes it), its API twin (``tests/api_prompts/<name>.api.json``, from ``app.graphToPrompt()``, what
"Queue" sends) and a JPEG screenshot of the graph as the template thumbnail
(``example_workflows/<name>.jpg``). Without ``--write`` it loads every shipped UI workflow into
the page and checks that the frontend knows all its node types and still converts it into exactly
the shipped API twin. A report goes to ``--out/workflows.json``.

    python tests/integration/export_workflows.py --comfyui-dir "$COMFYUI_DIR" --python "$COMFYUI_PYTHON" --write
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from browser_check import Browser  # noqa: E402
from comfyui_harness import REPO, ComfyUIServer  # noqa: E402

WORKFLOWS_DIR = REPO / "example_workflows"
API_DIR = REPO / "tests" / "api_prompts"
THUMB_WIDTH = 800

PROMPT = ("A quiet old town street in warm afternoon light, stone houses with wooden shutters, potted plants "
          "and a cobblestone road, realistic photo.")
#: The core single files (Comfy-Org/Wan_2.1_ComfyUI_repackaged) in the core model folders.
CORE_FILES = {"unet": "wan2.1_i2v_480p_14B_bf16.safetensors", "clip": "umt5_xxl_fp16.safetensors",
              "vae": "wan_2.1_vae.safetensors", "clip_vision": "clip_vision_h.safetensors"}
NEGATIVE = ""
SEED = 1024
#: The shipped 360-degree example (example_workflows/input/, copied into input/ by write_example_inputs).
PANORAMA_IMAGE = "worldstereo_panorama_room.png"
PANORAMA_PROMPT = "An empty room with checkered walls in soft coloured light, realistic photo."


def node(key, type_, pos, widgets=None, links=None, title=None) -> dict:
    return {"key": key, "type": type_, "pos": list(pos), "widgets": widgets or {}, "links": links or {},
            "title": title}


def loaders(variant: str, *, y: int = 0) -> list[dict]:
    """Core loaders (Load Diffusion Model, Load CLIP type wan, Load VAE, Load CLIP Vision) and
    WorldStereo Apply Variant on the diffusion model."""
    return [
        node("unet", "UNETLoader", (20, y), {"unet_name": CORE_FILES["unet"], "weight_dtype": "default"}),
        node("model", "WorldStereoApplyVariant", (20, y + 150), {"variant": variant, "attention_scope": "full"},
             {"model": ("unet", "MODEL")}),
        node("clip", "CLIPLoader", (20, y + 300), {"clip_name": CORE_FILES["clip"], "type": "wan"}),
        node("vae", "VAELoader", (20, y + 470), {"vae_name": CORE_FILES["vae"]}),
        node("clipvision", "CLIPVisionLoader", (20, y + 580), {"clip_name": CORE_FILES["clip_vision"]}),
    ]


def text(x: int, y: int) -> list[dict]:
    """The prompt and the negative prompt through CLIP Text Encode."""
    return [node("pos", "CLIPTextEncode", (x, y), {"text": PROMPT}, {"clip": ("clip", "CLIP")}, title="Prompt"),
            node("neg", "CLIPTextEncode", (x, y + 220), {"text": NEGATIVE}, {"clip": ("clip", "CLIP")},
                 title="Negative prompt")]


def conditioning(pos, *, memory: str | None = None) -> dict:
    links = {"model": ("model", "MODEL"), "positive": ("pos", "CONDITIONING"), "negative": ("neg", "CONDITIONING"),
             "vae": ("vae", "VAE"), "clip_vision": ("clipvision", "CLIP_VISION"), "start_image": ("resize", "image"),
             "render": ("render", "render"), "hole_mask": ("render", "hole_mask"), "trajectory": ("traj", "trajectory")}
    if memory:
        links["memory"] = (memory, "memory")
    return node("cond", "WorldStereoConditioning", pos, links=links)


def decode_and_save(x: int, latent: tuple[str, str], prefix: str) -> list[dict]:
    """WorldStereo VAE Decode Keyframes -> core Save Video."""
    return [
        node("decode", "WorldStereoVAEDecodeKeyframes", (x, 0), {"fps": 16.0},
             {"vae": ("vae", "VAE"), "samples": latent}),
        node("save", "SaveVideo", (x, 160), {"filename_prefix": prefix, "format": "auto", "codec": "auto"},
             {"video": ("decode", "video")}),
    ]


def image_scene(x: int) -> list[dict]:
    """Load image -> working size -> MoGe depth -> point cloud (two columns from ``x``)."""
    return [
        node("image", "LoadImage", (x, 0), {"image": "example.png"}),
        node("moge", "WorldStereoMoGeLoader", (x, 420), {"checkpoint": "moge-2-vitl-normal/model.pt",
                                                        "download": False}),
        node("resize", "WorldStereoResizeToBucket", (x, 560), links={"image": ("image", "IMAGE"),
                                                                   "model": ("model", "MODEL")}),
        node("depth", "WorldStereoMoGeDepth", (x + 400, 0), {"resolution_level": 9},
             {"moge": ("moge", "moge"), "image": ("resize", "image")}),
        node("lift", "WorldStereoLiftDepth", (x + 400, 160), {"fov_deg": 60.0, "sobel_threshold": 0.35, "contract": 8.0},
             {"image": ("resize", "image"), "depth": ("depth", "depth")}),
    ]


def camera_control() -> list[dict]:
    """worldstereo-camera sampled as the release: SamplerCustomAdvanced with WorldStereo Release Sigmas,
    the Release UniPC Sampler and CFG 5."""
    return loaders("worldstereo-camera") + image_scene(420) + text(1220, 760) + [
        node("traj", "WorldStereoTrajectoryPreset", (820, 340), {"preset": "orbit_left", "frames": 21, "scale": 1.0},
             {"point_cloud": ("lift", "point_cloud")}),
        node("render", "WorldStereoRenderWarps", (1220, 0), {"backend": "auto"},
             {"point_cloud": ("lift", "point_cloud"), "trajectory": ("traj", "trajectory"),
              "image": ("resize", "image")}),
        node("render_preview", "PreviewImage", (1220, 160), links={"images": ("render", "render")}),
        node("cloud", "WorldStereoSavePointCloud", (820, 620),
             {"filename_prefix": "WorldStereo/camera_control_cloud", "format": "glb", "world_up": "-y"},
             {"point_cloud": ("lift", "point_cloud"), "trajectory": ("traj", "trajectory")}),
        node("preview3d", "Preview3D", (1620, 560), links={"model_file": ("cloud", "model_file")}),
        conditioning((1620, 0)),
        node("sigmas", "WorldStereoReleaseSigmas", (1620, 420), {"steps": 40, "shift": 0.0},
             {"model": ("model", "MODEL")}),
        node("ksampler", "WorldStereoReleaseUniPCSampler", (1620, 560), {"solver_order": 2}),
    ] + custom_sampler(5.0) + decode_and_save(2380, ("sampler", "output"), "WorldStereo/camera_control")


def custom_sampler(cfg: float) -> list[dict]:
    """SamplerCustomAdvanced over the conditioning with the "sigmas" and "ksampler" nodes."""
    return [
        node("noise", "RandomNoise", (1620, 660), {"noise_seed": SEED, "control_after_generate": "fixed"}),
        node("guider", "CFGGuider", (1620, 780), {"cfg": cfg},
             {"model": ("model", "MODEL"), "positive": ("cond", "positive"), "negative": ("cond", "negative")}),
        node("sampler", "SamplerCustomAdvanced", (2000, 0), links={
            "noise": ("noise", "NOISE"), "guider": ("guider", "GUIDER"), "sampler": ("ksampler", "SAMPLER"),
            "sigmas": ("sigmas", "SIGMAS"), "latent_image": ("cond", "latent")}),
    ]


def loop(pos, widgets: dict, links: dict) -> dict:
    """The Multi-Trajectory Loop on the native MODEL and the core encoders (release sampling: cfg 0)."""
    return node("loop", "WorldStereoMultiTrajectoryLoop", pos,
                {"cache_mode": "release", "steps": 40, "cfg": 0.0, "shift": 0.0, "seed": SEED,
                 "control_after_generate": "fixed", **widgets},
                {"model": ("model", "MODEL"), "vae": ("vae", "VAE"), "clip": ("clip", "CLIP"),
                 "clip_vision": ("clipvision", "CLIP_VISION"), "moge": ("moge", "moge"),
                 "dinov2": ("dinov2", "dinov2"), **links})


def reconstruction() -> list[dict]:
    return loaders("worldstereo-memory") + [
        node("moge", "WorldStereoMoGeLoader", (420, 420), {"checkpoint": "moge-2-vitl-normal/model.pt",
                                                          "download": False}),
        node("dinov2", "WorldStereoDINOv2Loader", (420, 560), {"model": "dinov2-base", "download": False}),
        node("image", "LoadImage", (420, 0), {"image": "example.png"}),
        loop((760, 0), {"scene": "(the image input)", "task": "reconstruction", "prompt": PROMPT,
                        "output_folder": "WorldStereo/reconstruction"}, {"image": ("image", "IMAGE")}),
        node("frames", "CreateVideo", (1200, 0), {"fps": 16.0}, {"images": ("loop", "frames")}),
        node("save", "SaveVideo", (1200, 140), {"filename_prefix": "WorldStereo/reconstruction", "format": "auto",
                                                "codec": "auto"}, {"video": ("frames", "VIDEO")}),
        node("worldmirror", "WorldStereoExportWorldMirror", (1200, 380),
             {"folder_prefix": "WorldStereo/reconstruction_worldmirror", "scene": "example"},
             {"memory_bank": ("loop", "memory_bank")}),
        node("preview3d", "Preview3D", (1560, 0), links={"model_file": ("loop", "cloud_file")}),
    ]


def fast_dmd() -> list[dict]:
    """worldstereo-memory-dmd with SamplerCustomAdvanced: its DMD sigmas, core euler, CFG 1."""
    moves = json.dumps([{"type": "normal", "rotation": [25.0, 0.0], "frames": 10},
                        {"type": "normal", "backward-forward": 0.3, "frames": 10}], indent=1)
    return loaders("worldstereo-memory-dmd") + image_scene(420) + text(1220, 900) + [
        node("traj", "WorldStereoTrajectoryFromJSON", (820, 340), {"json_text": moves, "frames": 21, "scale": 1.0},
             {"point_cloud": ("lift", "point_cloud")}),
        node("bank", "WorldStereoMemoryBankCreate", (1220, 0),
             {"source": "start image", "folder": "", "max_reference": 8, "align_nframe": 8},
             {"point_cloud": ("lift", "point_cloud")}),
        node("retrieve", "WorldStereoMemoryRetrieve", (1220, 190), {"view_id": "comfy", "traj_id": "traj0"},
             {"memory_bank": ("bank", "memory_bank"), "trajectory": ("traj", "trajectory")}),
        node("refs", "PreviewImage", (1220, 380), links={"images": ("retrieve", "references")}),
        node("render", "WorldStereoRenderWarps", (1220, 660), {"backend": "auto"},
             {"point_cloud": ("lift", "point_cloud"), "trajectory": ("traj", "trajectory"),
              "image": ("resize", "image")}),
        conditioning((1620, 0), memory="retrieve"),
        node("sigmas", "WorldStereoDMDSigmas", (1620, 420), links={"model": ("model", "MODEL")}),
        node("ksampler", "KSamplerSelect", (1620, 560), {"sampler_name": "euler"}),
    ] + custom_sampler(1.0) + [
        node("add", "WorldStereoMemoryBankAddClip", (2380, 420),
             {"view_id": "comfy", "traj_id": "traj0", "save_folder": "WorldStereo/dmd_bank"},
             {"memory_bank": ("bank", "memory_bank"), "frames": ("decode", "images"),
              "trajectory": ("traj", "trajectory")}),
        node("worldmirror", "WorldStereoExportWorldMirror", (2380, 700),
             {"folder_prefix": "WorldStereo/dmd_worldmirror", "scene": "example"},
             {"memory_bank": ("add", "memory_bank")}),
    ] + decode_and_save(2380, ("sampler", "output"), "WorldStereo/dmd")


def panorama() -> list[dict]:
    """One equirectangular image in input/ -> Panorama Scene From Image (MoGe depth) -> the loop."""
    return loaders("worldstereo-memory") + [
        node("image", "LoadImage", (420, 0), {"image": PANORAMA_IMAGE}),
        node("moge", "WorldStereoMoGeLoader", (420, 420), {"checkpoint": "moge-2-vitl-normal/model.pt",
                                                          "download": False}),
        node("dinov2", "WorldStereoDINOv2Loader", (420, 560), {"model": "dinov2-base", "download": False}),
        node("scene", "WorldStereoPanoramaSceneFromImage", (760, 0),
             {"prompt": PANORAMA_PROMPT, "name": "panorama_room", "output_folder": "WorldStereo/panorama",
              "views": 4, "explorations": 2, "reconstructs": 1, "frames": 21, "bank_width": 832, "bank_height": 480},
             {"image": ("image", "IMAGE"), "moge": ("moge", "moge")}),
        node("bank_views", "PreviewImage", (760, 560), links={"images": ("scene", "bank_views")}),
        loop((1160, 0), {"scene": "(the image input)", "task": "panorama", "prompt": "",
                         "output_folder": "WorldStereo/panorama"}, {"panorama_scene": ("scene", "panorama_scene")}),
        node("frames", "CreateVideo", (1600, 0), {"fps": 16.0}, {"images": ("loop", "frames")}),
        node("save", "SaveVideo", (1600, 140), {"filename_prefix": "WorldStereo/panorama", "format": "auto",
                                                "codec": "auto"}, {"video": ("frames", "VIDEO")}),
        node("worldmirror", "WorldStereoExportWorldMirror", (1600, 380),
             {"folder_prefix": "WorldStereo/panorama_worldmirror", "scene": "panorama_room"},
             {"memory_bank": ("loop", "memory_bank")}),
        node("preview3d", "Preview3D", (2000, 0), links={"model_file": ("loop", "cloud_file")}),
    ]


WORKFLOWS = {
    "worldstereo_single_image_camera_control": camera_control,
    "worldstereo_multi_trajectory_reconstruction": reconstruction,
    "worldstereo_fast_dmd": fast_dmd,
    "worldstereo_panorama": panorama,
}

PAGE_BUILD = r"""
(spec) => {
  app.graph.clear();
  const made = {};
  for (const n of spec) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error(`unknown node type ${n.type}`);
    node.pos = n.pos;
    app.graph.add(node);
    if (n.title) node.title = n.title;
    for (const [name, value] of Object.entries(n.widgets)) {
      const w = node.widgets?.find((w) => w.name === name);
      if (!w) throw new Error(`${n.type}: no widget named ${name}`);
      w.value = value;
    }
    made[n.key] = node;
  }
  for (const n of spec) {
    for (const [input, [src, out]] of Object.entries(n.links)) {
      const s = made[src], d = made[n.key];
      const oi = s.outputs.findIndex((o) => o.name === out);
      const ii = d.inputs.findIndex((i) => i.name === input);
      if (oi < 0) throw new Error(`${s.type} has no output ${out}`);
      if (ii < 0) throw new Error(`${d.type} has no input ${input}`);
      s.connect(oi, d, ii);
    }
  }
  for (const node of Object.values(made)) {
    const size = node.computeSize();
    node.setSize([Math.max(size[0], node.size[0]), Math.max(size[1], node.size[1])]);
  }
  app.graph.setDirtyCanvas(true, true);
  return Object.keys(made).length;
}
"""

PAGE_FIT = r"""
(() => {
  const nodes = app.graph.nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const c = app.canvas.canvas;
  const w = c.clientWidth, h = c.clientHeight;
  const scale = Math.min(w / (x1 - x0 + 80), h / (y1 - y0 + 80), 1);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [-x0 + (w / scale - (x1 - x0)) / 2, -y0 + (h / scale - (y1 - y0)) / 2];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return scale;
})()
"""


def missing_types_expr() -> str:
    return ("(() => { const t = new Set(app.graph.nodes.map((n) => n.type)); "
            "return [...t].filter((x) => !LiteGraph.registered_node_types[x]); })()")


def open_ui(browser: Browser, url: str) -> None:
    """(Re)load the UI, so no preview of an earlier graph lingers under a reused node id."""
    browser.call("Page.navigate", {"url": url})
    browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph)", timeout=90)
    browser.wait_for("window.app.extensions?.some((e) => e.name === 'worldstereo.trajectoryPreview') || null",
                     timeout=30)


def build(browser: Browser, url: str, name: str, spec: list[dict], out: Path) -> dict:
    open_ui(browser, url)
    count = browser.evaluate(f"({PAGE_BUILD})({json.dumps(spec)})")
    result = browser.evaluate("(async () => { const p = await app.graphToPrompt(); "
                              "return {workflow: p.workflow, output: p.output}; })()")
    workflow, prompt = result["workflow"], result["output"]
    (WORKFLOWS_DIR / f"{name}.json").write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
    (API_DIR / f"{name}.api.json").write_text(json.dumps(prompt, indent=2) + "\n", encoding="utf-8")
    browser.evaluate(PAGE_FIT)
    try:  # let trajectory nodes draw their live preview before the screenshot
        browser.wait_for("app.graph.nodes.every((n) => !n.__worldstereoPreview || n.__worldstereoPreview.view.scene "
                         "|| n.__worldstereoPreview.view.message.startsWith('preview'))", timeout=20)
    except TimeoutError:
        pass
    time.sleep(0.5)
    thumb = WORKFLOWS_DIR / f"{name}.jpg"
    save_thumbnail(browser, thumb)
    shutil.copyfile(thumb, out / thumb.name)
    return {"name": name, "nodes": count, "api_nodes": len(prompt)}


def save_thumbnail(browser: Browser, path: Path) -> None:
    from PIL import Image

    data = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "jpeg", "quality": 90})["data"])
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.width > THUMB_WIDTH:
        image = image.resize((THUMB_WIDTH, round(image.height * THUMB_WIDTH / image.width)), Image.Resampling.LANCZOS)
    image.save(path, format="JPEG", quality=85)


def check(browser: Browser, path: Path) -> dict:
    """Load a shipped UI workflow; report missing node types and the diff of graphToPrompt vs the twin."""
    workflow = json.loads(path.read_text(encoding="utf-8"))
    browser.evaluate(f"(async () => {{ await app.loadGraphData({json.dumps(workflow)}); return true; }})()")
    missing = browser.evaluate(missing_types_expr())
    prompt = browser.evaluate("(async () => (await app.graphToPrompt()).output)()")
    twin_path = API_DIR / f"{path.stem}.api.json"
    twin = json.loads(twin_path.read_text(encoding="utf-8")) if twin_path.is_file() else None
    problems = [f"missing node types: {missing}"] if missing else []
    if twin is None:
        problems.append(f"no API twin {twin_path.name}")
    elif prompt != twin:
        diff = sorted(k for k in set(prompt) | set(twin) if prompt.get(k) != twin.get(k))
        problems.append(f"graphToPrompt differs from {twin_path.name} in nodes {diff}")
    return {"name": path.stem, "nodes": len(workflow.get("nodes", [])), "missing_types": missing,
            "errors": problems}


def prepare(server: ComfyUIServer, python: str | None) -> None:
    """Tiny models and example inputs in the server's base folder (combos list them)."""
    from tiny_models import write_example_inputs, write_tiny_models

    write_tiny_models(server.base_dir / "models", comfy_dir=server.comfy_dir, python=python)
    write_example_inputs(server.base_dir / "input", comfy_dir=server.comfy_dir)
    settings = server.base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"), required=not os.environ.get("COMFYUI_DIR"))
    parser.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON"))
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium")
                        or shutil.which("chromium-browser"))
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="ws_workflows_"))
    parser.add_argument("--write", action="store_true", help="rebuild the workflows, twins and thumbnails")
    parser.add_argument("--only", nargs="*", default=None, help="workflow names (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"workflows": [], "errors": []}
    server = ComfyUIServer(args.comfyui_dir, tempfile.mkdtemp(prefix="ws_comfy_"), python=args.python)
    server.prepare()
    prepare(server, args.python)
    with server:
        browser = Browser(args.chromium, width=2000, height=1100)
        try:
            names = args.only or list(WORKFLOWS)
            if args.write:
                WORKFLOWS_DIR.mkdir(exist_ok=True)
                API_DIR.mkdir(parents=True, exist_ok=True)
                for name in names:
                    report["workflows"].append(build(browser, server.base_url, name, WORKFLOWS[name](), out))
            open_ui(browser, server.base_url)
            for path in sorted(WORKFLOWS_DIR.glob("*.json")):
                if args.only and path.stem not in args.only:
                    continue
                result = check(browser, path)
                report["workflows"].append(result)
                report["errors"] += [f"{result['name']}: {e}" for e in result["errors"]]
            report["console_errors"] = [e for e in browser.console_errors() if "worldstereo" in e.lower()]
            report["errors"] += report["console_errors"]
        finally:
            browser.close()
    (out / "workflows.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
