"""Drive a real, headless ComfyUI with this pack loaded (standard library only).

``ComfyUIServer`` starts ``main.py`` from a ComfyUI checkout as a subprocess on a free loopback
port, with a throw-away ``--base-directory`` whose ``custom_nodes/`` holds a symlink to this
repository (the checkout itself is not modified) and only this pack whitelisted. It offers the
HTTP calls the tests need and ``run_prompt``, which opens a websocket first, queues an API prompt
with that client id, follows the messages until the prompt succeeds, fails or is interrupted,
and reads ``/history``. ``WebSocket`` is a small RFC 6455 client (also used for the Chromium
DevTools protocol by ``browser_check.py``), so nothing beyond the standard library is needed in
whichever Python runs the tests.

Environment: ``COMFYUI_DIR`` (checkout with ``main.py``), ``COMFYUI_PYTHON`` (its interpreter,
default ``sys.executable``), ``COMFYUI_START_TIMEOUT`` (seconds, default 180).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
#: Folder name of the pack inside custom_nodes/ (also its /extensions/<name>/ URL segment).
PACK_FOLDER = "ComfyUI-WorldStereo"
HOST = "127.0.0.1"
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- websocket client ----------------------------------------------------------------------

class WebSocketClosed(ConnectionError):
    pass


class WebSocket:
    """Minimal client: text/binary messages, fragmentation, ping/pong, close. Loopback use only."""

    _GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "ws" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"only ws:// loopback URLs are supported, got {url}")
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self._buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise WebSocketClosed("connection closed during the websocket handshake")
            self._buf += chunk
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        accept = base64.b64encode(hashlib.sha1((key + self._GUID).encode()).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            raise ConnectionError(f"websocket handshake failed: {lines[0]}")

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise WebSocketClosed("websocket connection closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self, timeout: Optional[float] = None) -> tuple[int, bytes]:
        """Next complete message as ``(opcode, payload)``: 1 = text, 2 = binary.

        Raises ``TimeoutError`` (socket.timeout) when nothing arrives in ``timeout`` seconds.
        """
        self.sock.settimeout(timeout)
        message, message_op = b"", None
        while True:
            b0, b1 = self._read(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise WebSocketClosed("server closed the websocket")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode != 0x0:
                message_op = opcode
            message += payload
            if fin:
                return message_op or 0x1, message

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


# --- the server ----------------------------------------------------------------------------

@dataclass
class PromptRun:
    """Outcome of :meth:`ComfyUIServer.run_prompt`."""

    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    messages: list[dict] = field(default_factory=list)
    binary_frames: int = 0
    history: dict = field(default_factory=dict)

    def data(self, event: str) -> list[dict]:
        """The ``data`` of every message of one type, in arrival order."""
        return [m.get("data", {}) for m in self.messages if m.get("type") == event]

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})


class PromptRejected(AssertionError):
    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"/prompt rejected the prompt (HTTP {status}): {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


class ComfyUIServer:
    """A headless ComfyUI subprocess using ``work_dir`` as its base directory."""

    def __init__(self, comfy_dir: str | Path, work_dir: str | Path, python: Optional[str] = None,
                 pack_dir: str | Path = REPO, extra_args: tuple[str, ...] = (),
                 extra_nodes: tuple[str, ...] = ()) -> None:
        self.comfy_dir = Path(comfy_dir).resolve()
        if not (self.comfy_dir / "main.py").is_file():
            raise FileNotFoundError(f"{self.comfy_dir} is not a ComfyUI checkout (no main.py)")
        self.python = python or sys.executable
        self.work_dir = Path(work_dir).resolve()
        self.base_dir = self.work_dir / "base"
        self.pack_dir = Path(pack_dir).resolve()
        self.extra_args = tuple(extra_args)
        #: further custom_nodes/ folders (the caller puts them there) that the server loads
        self.extra_nodes = tuple(extra_nodes)
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.work_dir / "comfyui.log"
        #: with only --base-directory given, ComfyUI keeps output/, temp/, input/, user/ in it
        self.output_dir = self.base_dir / "output"
        self.temp_dir = self.base_dir / "temp"

    # lifecycle
    def prepare(self) -> None:
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)

    def command(self) -> list[str]:
        b = self.base_dir
        return [self.python, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
                "--disable-auto-launch", "--disable-all-custom-nodes",
                "--whitelist-custom-nodes", PACK_FOLDER, *self.extra_nodes,
                "--database-url", "sqlite:///:memory:", "--base-directory", str(b), *self.extra_args]

    def start(self, timeout: Optional[float] = None) -> "ComfyUIServer":
        timeout = float(timeout or os.environ.get("COMFYUI_START_TIMEOUT", 180))
        self.prepare()
        self.port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self.get("/system_stats", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's PID, wait, then SIGKILL its whole process group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session leader's pid is the group id
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(5)

    def __enter__(self) -> "ComfyUIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # logs
    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def import_failures(self) -> list[str]:
        """Log lines reporting that this pack failed to import, or a traceback through its files
        (failures of ComfyUI's own optional nodes, e.g. audio without torchaudio, are ignored)."""
        marker = f"{os.sep}{PACK_FOLDER}{os.sep}"
        return [ln for ln in self.log_text().splitlines()
                if ("IMPORT FAILED" in ln and PACK_FOLDER in ln) or (ln.lstrip().startswith("File ") and marker in ln)]

    # HTTP
    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def request(self, method: str, path: str, body=None, timeout: float = 30.0) -> tuple[int, bytes, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    @staticmethod
    def _json(raw: bytes):
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode("utf-8", "replace")

    def get(self, path: str, timeout: float = 30.0):
        status, raw, _ = self.request("GET", path, timeout=timeout)
        return status, self._json(raw)

    def post(self, path: str, body=None, timeout: float = 30.0):
        status, raw, _ = self.request("POST", path, body if body is not None else {}, timeout=timeout)
        return status, self._json(raw)

    def object_info(self) -> dict:
        status, info = self.get("/object_info", timeout=60)
        assert status == 200, f"/object_info returned {status}"
        return info

    def history(self, prompt_id: str) -> dict:
        status, body = self.get(f"/history/{prompt_id}")
        assert status == 200, f"/history returned {status}"
        return (body or {}).get(prompt_id, {})

    def interrupt(self, prompt_id: Optional[str] = None) -> int:
        return self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})[0]

    def free(self) -> int:
        return self.post("/free", {"unload_models": True, "free_memory": True})[0]

    def queue(self, prompt: dict, client_id: str) -> tuple[int, dict]:
        """POST /prompt; returns (status, body) without raising (400 bodies hold node_errors)."""
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id})

    def run_prompt(self, prompt: dict, timeout: float = 300.0,
                   on_message: Optional[Callable[[dict, "ComfyUIServer", str], None]] = None) -> PromptRun:
        """Queue ``prompt`` and follow it to the end over the websocket; then read /history.

        ``on_message(message, server, prompt_id)`` sees every JSON message of this prompt (e.g.
        to POST /interrupt after the first progress message).
        """
        client_id = uuid.uuid4().hex
        ws = WebSocket(f"ws://{HOST}:{self.port}/ws?clientId={client_id}", timeout=30)
        try:
            status, body = self.queue(prompt, client_id)
            if status != 200:
                raise PromptRejected(status, body if isinstance(body, dict) else {"body": body})
            run = PromptRun(prompt_id=body["prompt_id"], status="")
            deadline = time.monotonic() + timeout
            while not run.status:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.interrupt(run.prompt_id)
                    raise TimeoutError(f"prompt {run.prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")
                try:
                    opcode, payload = ws.recv(timeout=min(remaining, 10.0))
                except (socket.timeout, TimeoutError):
                    continue
                if opcode == 0x2:
                    run.binary_frames += 1
                    continue
                message = json.loads(payload)
                data = message.get("data") or {}
                if isinstance(data, dict) and data.get("prompt_id") not in (None, run.prompt_id):
                    continue
                run.messages.append(message)
                if on_message is not None:
                    on_message(message, self, run.prompt_id)
                if message.get("type") in TERMINAL_EVENTS:
                    run.status = message["type"].split("_", 1)[1]
        finally:
            ws.close()
        run.history = self._wait_history(run.prompt_id)
        return run

    def _wait_history(self, prompt_id: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry.get("status", {}).get("completed") is not None or time.monotonic() > deadline:
                return entry
            time.sleep(0.2)
