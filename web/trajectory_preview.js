// WorldStereo camera-trajectory preview for the ComfyUI frontend.
//
// Draws the camera frustums of a trajectory (plus a sampled point cloud when the payload has one,
// else the first camera's depth-range box) on a canvas inside the trajectory nodes, with orbit
// controls: drag to rotate, wheel to zoom, double-click to reset.
// Data: the node's executed `ui` payload and, while editing, POST PREVIEW_ROUTE with the node's
// widget values. The payload format is defined in nodes/trajectory_preview.py.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAJECTORY_NODE_TYPES = [
  "WorldStereoTrajectoryPreset",
  "WorldStereoTrajectoryFromJSON",
  "WorldStereoCameraJSONLoad",
  "WorldStereoReconstructionTrajectories",
  "WorldStereoPanoramaSceneFromImage",
];
// Nodes whose trajectories exist only after they ran (planned from depth): no live requests.
const EXECUTED_ONLY_NODE_TYPES = ["WorldStereoPanoramaSceneFromImage"];
const PAYLOAD_KEY = "worldstereo_trajectory";
const PREVIEW_ROUTE = "/worldstereo/trajectory_preview";
const WIDGET_NAME = "trajectory_preview";
const VIEW_HEIGHT = 260;
const POLL_MS = 400;
const DEBOUNCE_MS = 250;
const FOV = (50 * Math.PI) / 180;
const NEAR_CLIP = 1e-3;
const HUES = [200, 30, 130, 290, 0, 60];
const MAX_FRUSTUMS = 16;

// ---- small vector helpers (3-vectors as arrays) -------------------------------------------
const sub = (a, b) => [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
const add = (a, b) => [a[0] + b[0], a[1] + b[1], a[2] + b[2]];
const mul = (a, s) => [a[0] * s, a[1] * s, a[2] * s];
const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
const norm = (a) => Math.hypot(a[0], a[1], a[2]);
const unit = (a, fallback = [0, 0, 1]) => {
  const n = norm(a);
  return n > 1e-12 ? mul(a, 1 / n) : fallback;
};
const column = (m, j) => [m[0][j], m[1][j], m[2][j]];

// ---- scene: cameras, frustum geometry and bounds from one payload -------------------------
function buildScene(entries) {
  const cams = [];
  const points = [];
  const boxes = [];
  entries.forEach((entry, ei) => {
    const c2ws = entry.c2w || [];
    const Ks = entry.K || [];
    const W = entry.width || 2 * (Ks[0]?.[0]?.[2] || 1);
    const H = entry.height || 2 * (Ks[0]?.[1]?.[2] || 1);
    c2ws.forEach((m, i) => {
      const K = Ks[i] || Ks[0];
      cams.push({
        entry: ei, index: i, count: c2ws.length, center: column(m, 3),
        axes: [column(m, 0), column(m, 1), column(m, 2)],
        // normalised image-plane corners (x/z, y/z) of the four image corners
        corners: [[0, 0], [W, 0], [W, H], [0, H]].map(([u, v]) => [(u - K[0][2]) / K[0][0], (v - K[1][2]) / K[1][1]]),
      });
    });
    for (const p of entry.points || []) points.push(p);
    if (Array.isArray(entry.depth_range) && c2ws.length) {
      boxes.push({ entry: ei, cam: cams.find((c) => c.entry === ei && c.index === 0), range: entry.depth_range });
    }
  });
  if (!cams.length) return null;

  const centers = cams.map((c) => c.center);
  const cloud = points.map((p) => [p[0], p[1], p[2]]);
  for (const b of boxes) {
    for (const corner of b.cam.corners) cloud.push(worldAt(b.cam, corner, b.range[1]));
  }
  const all = centers.concat(cloud);
  const mean = mul(all.reduce((s, p) => add(s, p), [0, 0, 0]), 1 / all.length);
  const dists = all.map((p) => norm(sub(p, mean))).sort((a, b) => a - b);
  const radius = Math.max(dists[Math.min(dists.length - 1, Math.floor(0.95 * dists.length))], 1e-3);
  const camSpread = Math.max(...centers.map((c) => norm(sub(c, mean))), 0);
  const up = unit(cams.reduce((s, c) => sub(s, c.axes[1]), [0, 0, 0]), [0, -1, 0]);
  let forward = sub(cams[0].axes[2], mul(up, dot(cams[0].axes[2], up)));
  forward = unit(forward, unit(cross(up, [1, 0, 0]), [0, 0, 1]));
  const frustumDepth = Math.max(0.12 * radius, 0.5 * camSpread / Math.max(Math.sqrt(cams.length), 1), 1e-3);
  return { cams, points, boxes, target: mean, radius, up, forward, frustumDepth, entries: entries.length };
}

function worldAt(cam, [x, y], depth) {
  const [r, d, f] = cam.axes;
  return add(cam.center, add(add(mul(r, x * depth), mul(d, y * depth)), mul(f, depth)));
}

// ---- the viewer ---------------------------------------------------------------------------
class TrajectoryView {
  constructor() {
    this.element = document.createElement("div");
    this.element.style.cssText = "position:relative;width:100%;height:100%;min-height:120px;";
    this.canvas = document.createElement("canvas");
    this.canvas.style.cssText = "width:100%;height:100%;display:block;border-radius:6px;cursor:grab;touch-action:none;";
    this.element.appendChild(this.canvas);
    this.scene = null;
    this.message = "waiting for a trajectory...";
    this.resetView();
    this.bindControls();
    if (typeof ResizeObserver !== "undefined") {
      this.observer = new ResizeObserver(() => this.draw());
      this.observer.observe(this.element);
    }
  }

  resetView() {
    this.yaw = 0.0;
    this.pitch = 0.45;
    this.zoom = 1.0;
  }

  bindControls() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY };
      c.setPointerCapture?.(e.pointerId);
      c.style.cursor = "grabbing";
      e.stopPropagation();
      e.preventDefault();
    });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      this.yaw -= (e.clientX - drag.x) * 0.01;
      this.pitch = Math.max(-1.5, Math.min(1.5, this.pitch + (e.clientY - drag.y) * 0.01));
      drag = { x: e.clientX, y: e.clientY };
      this.draw();
      e.stopPropagation();
    });
    const end = (e) => {
      drag = null;
      c.style.cursor = "grab";
      c.releasePointerCapture?.(e.pointerId);
    };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("wheel", (e) => {
      this.zoom = Math.max(0.1, Math.min(50, this.zoom * Math.exp(-e.deltaY * 0.0015)));
      this.draw();
      e.preventDefault();
      e.stopPropagation();
    }, { passive: false });
    c.addEventListener("dblclick", (e) => {
      this.resetView();
      this.draw();
      e.stopPropagation();
    });
  }

  setPayload(entries) {
    try {
      this.scene = Array.isArray(entries) && entries.length ? buildScene(entries) : null;
      this.message = this.scene ? "" : "empty trajectory";
    } catch (err) {
      this.scene = null;
      this.message = `cannot draw trajectory: ${err?.message || err}`;
    }
    this.draw();
  }

  setMessage(text) {
    this.message = text || "";
    this.draw();
  }

  // Orbit camera: eye on a sphere around the scene centre, y up on screen = world up.
  viewBasis(width, height) {
    const s = this.scene;
    const side = unit(cross(s.forward, s.up));
    const dir = add(mul(add(mul(s.forward, -Math.cos(this.yaw)), mul(side, Math.sin(this.yaw))), Math.cos(this.pitch)),
      mul(s.up, Math.sin(this.pitch)));
    const dist = (1.15 * s.radius) / Math.sin(FOV / 2) / this.zoom;
    const eye = add(s.target, mul(dir, dist));
    const vz = unit(sub(s.target, eye));
    const vx = unit(cross(vz, s.up), side);
    const vy = cross(vx, vz);
    const focal = (0.5 * Math.min(width, height)) / Math.tan(FOV / 2);
    return { eye, vx, vy, vz, focal, cx: width / 2, cy: height / 2 };
  }

  toView(v, p) {
    const d = sub(p, v.eye);
    return [dot(d, v.vx), dot(d, v.vy), dot(d, v.vz)];
  }

  toScreen(v, q) {
    return [v.cx + (v.focal * q[0]) / q[2], v.cy - (v.focal * q[1]) / q[2]];
  }

  line(ctx, v, a, b) {
    let p = this.toView(v, a);
    let q = this.toView(v, b);
    if (p[2] < NEAR_CLIP && q[2] < NEAR_CLIP) return;
    if (p[2] < NEAR_CLIP || q[2] < NEAR_CLIP) {
      const t = (NEAR_CLIP - p[2]) / (q[2] - p[2]);
      const m = add(p, mul(sub(q, p), t));
      if (p[2] < NEAR_CLIP) p = m; else q = m;
    }
    const [x0, y0] = this.toScreen(v, p);
    const [x1, y1] = this.toScreen(v, q);
    ctx.moveTo(x0, y0);
    ctx.lineTo(x1, y1);
  }

  draw() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(this.canvas.clientWidth * dpr));
    const h = Math.max(1, Math.round(this.canvas.clientHeight * dpr));
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
    }
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#16181d";
    ctx.fillRect(0, 0, w, h);
    ctx.scale(dpr, dpr);
    const width = w / dpr;
    const height = h / dpr;
    if (this.scene) this.drawScene(ctx, width, height);
    ctx.font = "11px sans-serif";
    ctx.fillStyle = "#8a93a6";
    if (this.scene) {
      const n = this.scene.cams.length;
      ctx.fillText(`${n} camera${n === 1 ? "" : "s"} · drag: rotate · wheel: zoom · double-click: reset`, 6, height - 6);
    }
    if (this.message) {
      ctx.fillStyle = this.scene ? "#e0a050" : "#aab2c0";
      ctx.fillText(this.message, 6, 14, width - 12);
    }
  }

  drawScene(ctx, width, height) {
    const s = this.scene;
    const v = this.viewBasis(width, height);
    // points, far to near
    const pts = [];
    for (const p of s.points) {
      const q = this.toView(v, p);
      if (q[2] > NEAR_CLIP) pts.push([q, p]);
    }
    pts.sort((a, b) => b[0][2] - a[0][2]);
    const size = Math.max(1.2, Math.min(3.5, 1200 / Math.sqrt(pts.length + 1) / Math.max(width, height) * 4));
    for (const [q, p] of pts) {
      const [x, y] = this.toScreen(v, q);
      ctx.fillStyle = `rgb(${p[3] ?? 200},${p[4] ?? 200},${p[5] ?? 200})`;
      ctx.fillRect(x - size / 2, y - size / 2, size, size);
    }
    // depth-range boxes (first camera's view volume between near and far)
    for (const b of s.boxes) {
      const near = b.cam.corners.map((c) => worldAt(b.cam, c, b.range[0]));
      const far = b.cam.corners.map((c) => worldAt(b.cam, c, b.range[1]));
      ctx.strokeStyle = "rgba(160,170,190,0.55)";
      ctx.setLineDash([4, 3]);
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let i = 0; i < 4; i++) {
        this.line(ctx, v, near[i], near[(i + 1) % 4]);
        this.line(ctx, v, far[i], far[(i + 1) % 4]);
        this.line(ctx, v, near[i], far[i]);
      }
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = "rgba(120,140,170,0.10)";
      const quad = far.map((p) => this.toView(v, p));
      if (quad.every((q) => q[2] > NEAR_CLIP)) {
        ctx.beginPath();
        quad.forEach((q, i) => {
          const [x, y] = this.toScreen(v, q);
          if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        });
        ctx.closePath();
        ctx.fill();
      }
    }
    // camera path per entry
    for (let e = 0; e < s.entries; e++) {
      const cams = s.cams.filter((c) => c.entry === e);
      ctx.strokeStyle = `hsla(${HUES[e % HUES.length]},70%,65%,0.9)`;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      for (let i = 1; i < cams.length; i++) this.line(ctx, v, cams[i - 1].center, cams[i].center);
      ctx.stroke();
    }
    // frustums (at most MAX_FRUSTUMS per trajectory, always the first and the last): lightness
    // runs from start (dark) to end (light); the first camera is drawn thicker
    const d = s.frustumDepth;
    for (const cam of s.cams) {
      const stride = Math.ceil(cam.count / MAX_FRUSTUMS);
      if (cam.index % stride !== 0 && cam.index !== cam.count - 1) continue;
      const t = cam.count > 1 ? cam.index / (cam.count - 1) : 0;
      const hue = HUES[cam.entry % HUES.length];
      const corners = cam.corners.map((c) => worldAt(cam, c, d));
      ctx.strokeStyle = `hsla(${hue},80%,${40 + 35 * t}%,${cam.index === 0 ? 1 : 0.75})`;
      ctx.lineWidth = cam.index === 0 ? 2.2 : 1;
      ctx.beginPath();
      for (let i = 0; i < 4; i++) {
        this.line(ctx, v, cam.center, corners[i]);
        this.line(ctx, v, corners[i], corners[(i + 1) % 4]);
      }
      // "up" tick on the image's top edge
      const top = mul(add(corners[0], corners[1]), 0.5);
      this.line(ctx, v, top, sub(top, mul(cam.axes[1], 0.25 * d)));
      ctx.stroke();
    }
  }
}

// ---- node integration ---------------------------------------------------------------------
function widgetValues(node) {
  const values = {};
  for (const w of node.widgets || []) {
    if (!w?.name || w.name === WIDGET_NAME || w.type === "button") continue;
    const value = w.value;
    if (value === undefined || typeof value === "function") continue;
    values[w.name] = value;
  }
  return values;
}

function attachPreview(node) {
  if (node.__worldstereoPreview) return;
  const view = new TrajectoryView();
  const widget = node.addDOMWidget(WIDGET_NAME, "worldstereo_preview", view.element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => VIEW_HEIGHT,
    getHeight: () => VIEW_HEIGHT,
  });
  widget.serialize = false; // keep widgets_values (positional) free of a phantom entry
  const state = { view, widget, signature: null, timer: null, seq: 0 };
  node.__worldstereoPreview = state;

  const request = async () => {
    const seq = ++state.seq;
    try {
      const response = await api.fetchApi(PREVIEW_ROUTE, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ node_type: node.comfyClass || node.type, inputs: widgetValues(node) }),
      });
      const body = await response.json().catch(() => ({}));
      if (seq !== state.seq) return; // a newer request is under way
      if (response.ok && Array.isArray(body?.[PAYLOAD_KEY])) view.setPayload(body[PAYLOAD_KEY]);
      else view.setMessage(`preview: ${body?.error || `HTTP ${response.status}`}`);
    } catch (err) {
      if (seq === state.seq) view.setMessage(`preview unavailable: ${err?.message || err}`);
    }
  };
  state.schedule = () => {
    clearTimeout(state.timer);
    state.timer = setTimeout(request, DEBOUNCE_MS);
  };
  // Widget edits arrive through several paths (canvas widgets, DOM text areas, workflow load),
  // so besides the onWidgetChanged hook the values are compared periodically.
  state.check = () => {
    if (!node.graph || document.hidden) return;
    if (EXECUTED_ONLY_NODE_TYPES.includes(node.comfyClass || node.type)) return;
    let signature;
    try {
      signature = JSON.stringify(widgetValues(node));
    } catch {
      return;
    }
    if (signature !== state.signature) {
      state.signature = signature;
      state.schedule();
    }
  };
  state.poll = setInterval(state.check, POLL_MS);
  if (EXECUTED_ONLY_NODE_TYPES.includes(node.comfyClass || node.type)) {
    view.setMessage("the planned trajectories appear here once the node has run");
  }

  const size = node.computeSize?.();
  if (size) node.setSize?.([Math.max(size[0], 340), Math.max(size[1], node.size?.[1] || 0)]);
}

function detachPreview(node) {
  const state = node.__worldstereoPreview;
  if (!state) return;
  clearInterval(state.poll);
  clearTimeout(state.timer);
  state.view.observer?.disconnect();
  delete node.__worldstereoPreview;
}

app.registerExtension({
  name: "worldstereo.trajectoryPreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TRAJECTORY_NODE_TYPES.includes(nodeData?.name)) return;
    const proto = nodeType.prototype;

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        attachPreview(this);
      } catch (err) {
        console.warn("[worldstereo] trajectory preview unavailable:", err);
      }
      return result;
    };

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const entries = output?.[PAYLOAD_KEY];
      if (Array.isArray(entries)) this.__worldstereoPreview?.view.setPayload(entries);
      return result;
    };

    const onWidgetChanged = proto.onWidgetChanged;
    proto.onWidgetChanged = function (name) {
      const result = onWidgetChanged?.apply(this, arguments);
      if (name !== WIDGET_NAME) this.__worldstereoPreview?.check?.();
      return result;
    };

    const onRemoved = proto.onRemoved;
    proto.onRemoved = function () {
      detachPreview(this);
      return onRemoved?.apply(this, arguments);
    };
  },
});
