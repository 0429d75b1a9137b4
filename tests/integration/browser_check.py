"""Check the pack in the real ComfyUI frontend with headless Chromium (DevTools protocol).

Starts a headless ComfyUI with the pack (see comfyui_harness.py), opens its UI in Chromium and
checks that: the ``worldstereo.trajectoryPreview`` extension registered; the page logged no error
that involves the pack; every trajectory node type listed in ``web/trajectory_preview.js`` that the
server knows gets a preview canvas, draws a live preview from its widget values and redraws when
a widget changes; the preview widget adds nothing to the saved workflow or the API prompt; output
trajectory nodes draw their executed payload. Writes ``report.json`` and one screenshot per node
type into ``--out``. Exit code 0 when every check passed.

    python tests/integration/browser_check.py --comfyui-dir "$COMFYUI_DIR" \
        --python "$COMFYUI_PYTHON" --out /tmp/ws_browser
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_harness import HOST, PACK_FOLDER, REPO, ComfyUIServer, WebSocket, free_port  # noqa: E402

EXTENSION_NAME = "worldstereo.trajectoryPreview"
PAYLOAD_KEY = "worldstereo_trajectory"
#: A trajectory file put into input/ so the camera.json node has something to preview.
CAMERA_JSON = "worldstereo_example_camera.json"


def write_camera_json(path: Path, frames: int = 21) -> Path:
    """A camera.json (reference schema) of a camera sliding right while turning left, 512x320."""
    import math

    extrinsic, intrinsic = [], []
    for i in range(frames):
        a = math.radians(-20.0 * i / (frames - 1))
        c, s = math.cos(a), math.sin(a)
        extrinsic.append([[c, 0.0, -s, -0.3 * i / (frames - 1)], [0.0, 1.0, 0.0, 0.0], [s, 0.0, c, 0.0],
                          [0.0, 0.0, 0.0, 1.0]])
        intrinsic.append([[400.0, 0.0, 256.0], [0.0, 400.0, 160.0], [0.0, 0.0, 1.0]])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"extrinsic": extrinsic, "intrinsic": intrinsic, "width": 512, "height": 320}))
    return path


def _js_list(pack_dir: Path, name: str) -> list[str]:
    source = (pack_dir / "web" / "trajectory_preview.js").read_text(encoding="utf-8")
    block = re.search(rf"const {name} = \[(.*?)\];", source, re.S)
    return re.findall(r'"([^"]+)"', block.group(1)) if block else []


def trajectory_node_types(pack_dir: Path) -> list[str]:
    """The node types with a live preview (drawn from their widget values before they run)."""
    executed_only = set(executed_only_node_types(pack_dir))
    return [t for t in _js_list(pack_dir, "TRAJECTORY_NODE_TYPES") if t not in executed_only]


def executed_only_node_types(pack_dir: Path) -> list[str]:
    """The node types whose preview is drawn only from their executed payload."""
    return _js_list(pack_dir, "EXECUTED_ONLY_NODE_TYPES")


def check_executed_only_node(browser: "Browser", node_type: str, index: int) -> dict:
    """The preview canvas exists, says it waits for a run, and sends no live request; a payload
    handed to onExecuted (what the server's executed message carries) is drawn."""
    result: dict = {"node_type": node_type, "errors": []}
    browser.evaluate(f"window.__ws.add({json.dumps(node_type)}, {40 + 420 * index}, 460)")
    state = browser.evaluate(f"window.__ws.state({json.dumps(node_type)})")
    if not state:
        result["errors"].append("no preview widget")
        return result
    if "once the node has run" not in state["message"]:
        result["errors"].append(f"unexpected preview message before a run: {state['message']!r}")
    payload = {"worldstereo_trajectory": [{"c2w": [[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z], [0, 0, 0, 1]]
                                                   for z in (0.0, 0.5)],
                                           "K": [[[50, 0, 32], [0, 50, 24], [0, 0, 1]]] * 2, "width": 64,
                                           "height": 48, "label": "view0/traj0",
                                           "points": [[0, 0, 3, 200, 10, 10], [1, 0, 3, 10, 200, 10]]}]}
    drawn = browser.evaluate(f"""(() => {{
        const node = window.__ws.node({json.dumps(node_type)});
        node.onExecuted({json.dumps(payload)});
        return window.__ws.state({json.dumps(node_type)});
    }})()""")
    result["executed"] = drawn
    if not drawn or drawn["cams"] != 2 or drawn["points"] != 2:
        result["errors"].append(f"an executed payload was not drawn: {drawn}")
    return result


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, executable: str, width: int = 1400, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="ws_chromium_")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--remote-debugging-address={HOST}", f"--remote-debugging-port={self.port}",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.ws = WebSocket(self._page_ws_url(), timeout=30)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _page_ws_url(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/json/list", timeout=2) as resp:
                    pages = [t for t in json.load(resp) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("Chromium did not open its DevTools port")

    def call(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        self.next_id += 1
        call_id = self.next_id
        self.ws.send_text(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _op, raw = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            msg = json.loads(raw)
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(method)

    def evaluate(self, expression: str, timeout: float = 60.0):
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {json.dumps(result['exceptionDetails'])[:1500]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out waiting for: {expression}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        errors = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                           for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        return errors

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


# Page-side helpers (installed once per page): add a node, read its preview state.
PAGE_HELPERS = r"""
window.comfyAPI.api.api.addEventListener("executed", (e) => window.__ws.executed.push(e.detail));
window.__ws = {
  add(type, x, y) {
    const node = LiteGraph.createNode(type);
    node.pos = [x, y];
    app.graph.add(node);
    app.graph.setDirtyCanvas(true, true);
    return app.graph.nodes.indexOf(node);
  },
  node(type) { return app.graph.nodes.find((n) => n.type === type); },
  executed: [],
  state(type) {
    const p = window.__ws.node(type)?.__worldstereoPreview;
    if (!p) return null;
    const s = p.view.scene;
    return { cams: s ? s.cams.length : 0, points: s ? s.points.length : 0, boxes: s ? s.boxes.length : 0,
             message: p.view.message, canvas: [p.view.canvas.width, p.view.canvas.height] };
  },
};
true
"""


def check_node(browser: Browser, server: ComfyUIServer, node_type: str, node_def: dict, index: int, out: Path) -> dict:
    result: dict = {"node_type": node_type, "errors": []}
    browser.evaluate(f"window.__ws.add({json.dumps(node_type)}, {40 + 420 * index}, 60)")
    try:
        result["live"] = browser.wait_for(f"(() => {{ const s = window.__ws.state({json.dumps(node_type)});"
                                          " return s && (s.cams > 0 || s.message.startsWith('preview')) ? s : null; })()",
                                          timeout=30)
    except TimeoutError:
        result["errors"].append("no preview widget or no live preview within 30 s")
        return result
    if not result["live"]["cams"]:
        result["errors"].append(f"live preview failed: {result['live']['message']}")
    # change the first numeric widget and expect a redraw with the new values
    changed = browser.evaluate(f"""(() => {{
        const node = window.__ws.node({json.dumps(node_type)});
        const w = node.widgets.find((w) => w.type === "number");
        if (!w) return null;
        const old = w.value;
        const step = w.options?.round || w.options?.step2 || 1;
        const next = (w.options?.max !== undefined && old + step > w.options.max) ? old - step : old + step;
        node.__worldstereoPreview.view.scene = null;
        w.value = next;
        node.onWidgetChanged?.(w.name, next, old, w);
        return [w.name, old, next];
    }})()""")
    if changed:
        try:
            result["after_change"] = browser.wait_for(
                f"(() => {{ const s = window.__ws.state({json.dumps(node_type)}); return s && s.cams > 0 ? s : null; }})()",
                timeout=30)
            result["changed_widget"] = changed
        except TimeoutError:
            result["errors"].append(f"no redraw after changing widget {changed[0]}")
    # orbit controls: drag on the canvas rotates, the wheel zooms
    rect = browser.evaluate(f"""(() => {{
        const v = window.__ws.node({json.dumps(node_type)}).__worldstereoPreview.view;
        const r = v.canvas.getBoundingClientRect();
        return {{ x: r.x + r.width / 2, y: r.y + r.height / 2, yaw: v.yaw, zoom: v.zoom }};
    }})()""")
    x, y = rect["x"], rect["y"]
    for kind, dx in (("mousePressed", 0), ("mouseMoved", 40), ("mouseMoved", 80), ("mouseReleased", 80)):
        browser.call("Input.dispatchMouseEvent", {"type": kind, "x": x + dx, "y": y, "button": "left",
                                                   "buttons": 0 if kind == "mouseReleased" else 1, "clickCount": 1})
    browser.call("Input.dispatchMouseEvent", {"type": "mouseWheel", "x": x, "y": y, "deltaX": 0, "deltaY": -240})
    after = browser.evaluate(f"""(() => {{
        const v = window.__ws.node({json.dumps(node_type)}).__worldstereoPreview.view;
        return {{ yaw: v.yaw, zoom: v.zoom, graph_scale: app.canvas.ds.scale }};
    }})()""")
    result["orbit"] = {"before": rect, "after": after}
    if abs(after["yaw"] - rect["yaw"]) < 0.1:
        result["errors"].append("dragging the preview did not rotate it")
    if not after["zoom"] > rect["zoom"]:
        result["errors"].append("the mouse wheel did not zoom the preview")
    if after["graph_scale"] != 1:
        result["errors"].append("the wheel over the preview also zoomed the graph canvas")
    # the preview widget must not reach the API prompt or the saved widgets_values
    declared = set(node_def["input"].get("required", {})) | set(node_def["input"].get("optional", {}))
    serialized = browser.evaluate(f"""(async () => {{
        const node = window.__ws.node({json.dumps(node_type)});
        const api = await app.graphToPrompt();
        const entry = api.output[String(node.id)];
        return {{ inputs: entry ? Object.keys(entry.inputs) : null, widgets_values: node.serialize().widgets_values,
                  widget_names: node.widgets.map((w) => w.name) }};
    }})()""")
    result["serialized"] = serialized
    if serialized["inputs"] is not None and not set(serialized["inputs"]) <= declared:
        result["errors"].append(f"API prompt has undeclared inputs {sorted(set(serialized['inputs']) - declared)}")
    if len([v for v in serialized["widgets_values"] if v is not None]) > len(serialized["widget_names"]) - 1:
        result["errors"].append(f"widgets_values has an entry for the preview widget: {serialized['widgets_values']}")
    if node_def.get("output_node"):
        # run the graph from the browser; the executed ui payload must reach onExecuted and be drawn
        browser.evaluate(f"""(async () => {{
            const node = window.__ws.node({json.dumps(node_type)});
            node.__worldstereoPreview.view.scene = null;
            window.__ws.executed = [];
            await app.queuePrompt(0, 1);
            return true;
        }})()""")
        try:
            result["executed"] = browser.wait_for(f"""(() => {{
                const node = window.__ws.node({json.dumps(node_type)});
                const done = window.__ws.executed.some((d) => String(d.node) === String(node.id)
                                                          && d.output && d.output.{PAYLOAD_KEY});
                const s = window.__ws.state({json.dumps(node_type)});
                return done && s && s.cams > 0 ? s : null;
            }})()""", timeout=120)
        except TimeoutError:
            result["errors"].append("executed payload was not drawn")
    result["screenshot"] = str(browser.screenshot(out / f"{node_type}.png"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"), required=not os.environ.get("COMFYUI_DIR"))
    parser.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON"))
    parser.add_argument("--pack-dir", default=str(REPO), help="pack to load (default: this repository)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="ws_browser_"))
    args = parser.parse_args(argv)
    if not args.chromium:
        print("chromium not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"errors": [], "nodes": []}
    with ComfyUIServer(args.comfyui_dir, tempfile.mkdtemp(prefix="ws_comfy_"), python=args.python,
                       pack_dir=args.pack_dir) as server:
        object_info = server.object_info()
        # a fresh user would get the template browser on top of the canvas; mark it as seen
        settings = server.base_dir / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        write_camera_json(server.base_dir / "input" / CAMERA_JSON)
        browser = Browser(args.chromium, width=1800, height=1100)
        try:
            t0 = time.monotonic()
            browser.call("Page.navigate", {"url": server.base_url})
            browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph)", timeout=90)
            report["ui_ready_s"] = round(time.monotonic() - t0, 1)
            try:
                report["extension_registered"] = bool(browser.wait_for(
                    f"window.app.extensions?.some((e) => e.name === {json.dumps(EXTENSION_NAME)}) || null", timeout=30))
            except TimeoutError:
                report["extension_registered"] = False
            browser.evaluate(PAGE_HELPERS)
            browser.evaluate("app.graph.clear(); app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; true")
            present = [t for t in trajectory_node_types(Path(args.pack_dir)) if t in object_info]
            report["trajectory_nodes_present"] = present
            for i, node_type in enumerate(present):
                report["nodes"].append(check_node(browser, server, node_type, object_info[node_type], i, out))
            executed_only = [t for t in executed_only_node_types(Path(args.pack_dir)) if t in object_info]
            report["executed_only_nodes_present"] = executed_only
            for i, node_type in enumerate(executed_only):
                report["nodes"].append(check_executed_only_node(browser, node_type, i))
            report["screenshot"] = str(browser.screenshot(out / "ui.png"))
            all_errors = browser.console_errors()
            ours = [e for e in all_errors if "worldstereo" in e.lower() or PACK_FOLDER.lower() in e.lower()]
            report["console_errors_pack"] = ours
            report["console_errors_other"] = [e for e in all_errors if e not in ours]
        finally:
            browser.close()
    if not report.get("extension_registered"):
        report["errors"].append(f"extension {EXTENSION_NAME} did not register")
    report["errors"] += report.get("console_errors_pack", [])
    for node in report["nodes"]:
        report["errors"] += [f"{node['node_type']}: {e}" for e in node["errors"]]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
