"""Post-install step (ComfyUI-Manager runs this after cloning; you can run it by hand).

Installs requirements.txt into the current Python, then MoGe from ``dlr-moge`` WITHOUT its
declared dependencies: they would pull gradio and a CUDA torchvision that replaces or breaks
your torch. torch itself is never touched.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MOGE = "dlr-moge>=2.0.0"


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", *args])


def main() -> None:
    pip("-r", str(HERE / "requirements.txt"))
    pip("--no-deps", MOGE)


if __name__ == "__main__":
    main()
