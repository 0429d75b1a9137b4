"""Reading safetensors checkpoints tensor by tensor, without memory-mapping them.

The safetensors library maps a whole file copy-on-write; on a machine whose RAM plus swap is
smaller than the file (the 34.9 GB DMD variant on a 32 GB box) the kernel may refuse that mapping.
Here the header (8-byte length + JSON) is parsed and checked on its own, and each tensor is read
with one ``readinto`` into its own buffer: memory is one tensor at a time, and a file's names,
shapes and dtypes are known without touching its data. Every check names the file.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..errors import CheckpointError, MissingWeightsError

#: torch dtype of each safetensors dtype name this reader accepts.
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
#: A header larger than this is not a safetensors header (the 14B files have ~200 KB).
MAX_HEADER_BYTES = 100 * 2**20
#: How many offending names a message lists before summarising.
MAX_LISTED = 8


def listing(names: Iterable[str]) -> str:
    """``a, b, c (3)`` or the first MAX_LISTED names and the count."""
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else f" ({len(names)})")


def is_float_dtype(name: str) -> bool:
    """Whether a safetensors dtype name (``BF16``, ``F32``, ``F8_E4M3``, ``I32`` ...) is floating point."""
    return name == "BF16" or name.startswith("F")


def require_finite(tensor: torch.Tensor, name: str, source: str) -> None:
    """CheckpointError naming ``source`` and ``name`` when ``tensor`` holds NaN or inf.

    One reduction per tensor, no copy for 2-byte and wider floats: the sum is non-finite when an
    element is; a sum that is only too large is confirmed element by element."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    values = tensor if tensor.element_size() > 1 else tensor.float()  # float8 has no reduction kernels
    if torch.isfinite(values.sum()) or bool(torch.isfinite(values).all()):
        return
    raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values; the file is damaged (or was "
                          "saved from a model that diverged): re-download it")


def require_weights(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming ``source`` when a tensor of ``state`` meant for a floating-point entry of
    ``model_state`` is not floating point, or holds NaN / inf."""
    ints = [f"{k} ({v.dtype})" for k, v in state.items()
            if k in model_state and model_state[k].is_floating_point() and not v.is_floating_point()]
    if ints:
        raise CheckpointError(f"{source}: weights must be floating point, but {listing(ints)} are stored as integers "
                              "or booleans; this is not a weight file of this model (or it was damaged): download it "
                              "again")
    for name, value in state.items():
        require_finite(value, name, source)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: stored dtype name, shape and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({why}); it is truncated or corrupt: "
                           "re-download it")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file in data order, after checking that the header is sound and
    that its byte ranges tile the data exactly up to the end of the file."""
    if not path.is_file():
        raise MissingWeightsError(f"weight file not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is not a .safetensors file; only safetensors weights are loaded "
                              "(convert pickled .bin/.pt/.ckpt weights to safetensors first)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(path, f"header length {length} for a file of {size} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        raise _corrupt(path, str(exc)) from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    entries, position = {}, 0
    tensors = [(k, v) for k, v in header.items() if k != "__metadata__"]
    try:
        tensors.sort(key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in tensors:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            if dtype not in TORCH_DTYPES:
                raise _corrupt(path, f"tensor {name} has dtype {dtype}, which this loader does not read")
            nbytes = math.prod(shape) * TORCH_DTYPES[dtype].itemsize
            if begin != position or end - begin != nbytes:
                raise _corrupt(path, f"tensor {name} has byte range [{begin}, {end}), expected {nbytes} bytes "
                                     f"from {position}")
            entries[name] = TensorEntry(dtype, shape, 8 + length + begin, 8 + length + end)
            position = end
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _corrupt(path, f"malformed tensor entry ({exc!r})") from exc
    if 8 + length + position != size:
        raise _corrupt(path, f"the header describes {8 + length + position} bytes but the file has {size}")
    return entries


def read_tensor(handle, entry: TensorEntry, path: Path) -> torch.Tensor:
    """One tensor read from an open file (CPU, its stored dtype, its own buffer)."""
    dtype = TORCH_DTYPES[entry.dtype]
    buffer = bytearray(entry.end - entry.start)
    handle.seek(entry.start)
    if handle.readinto(buffer) != len(buffer):
        raise _corrupt(path, "it ended while reading")
    if not buffer:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)


class SafetensorsFiles:
    """Lazy view of one or more safetensors files as a single key -> tensor mapping (``rename``
    maps stored names to the names the model uses)."""

    def __init__(self, files: list[Path], rename: Callable[[str], str] | None = None) -> None:
        self.files = files
        self._where: dict[str, tuple[Path, TensorEntry]] = {}
        for path in files:
            for stored, entry in read_header(path).items():
                name = rename(stored) if rename else stored
                if name in self._where:
                    raise CheckpointError(f"tensor {name} appears twice ({self._where[name][0]} and {path}); "
                                          "remove the duplicate file")
                self._where[name] = (path, entry)

    @property
    def shapes(self) -> dict[str, tuple]:
        return {name: entry.shape for name, (_, entry) in self._where.items()}

    def keys(self) -> list[str]:
        return list(self._where)

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype name of ``name``."""
        return self._where[name][1].dtype

    def path_of(self, name: str) -> Path:
        return self._where[name][0]

    def require_float(self, names: Iterable[str]) -> None:
        """CheckpointError naming the file when one of ``names`` is not stored as floating point."""
        bad = [n for n in names if not is_float_dtype(self.dtype(n))]
        if bad:
            raise CheckpointError(
                f"{self.path_of(bad[0])}: weights must be floating point, but "
                f"{listing(f'{n} ({self.dtype(n)})' for n in bad)} are stored as integers or booleans; this is not "
                "a weight file of this model (or it was damaged): re-download it")

    def iter_tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` on CPU, file by file in data order; NaN / inf is a CheckpointError."""
        wanted: dict[Path, list[str]] = {}
        for name in names:
            wanted.setdefault(self.path_of(name), []).append(name)
        for path, group in wanted.items():
            group.sort(key=lambda n: self._where[n][1].start)
            try:
                handle = open(path, "rb")
            except OSError as exc:
                raise CheckpointError(f"cannot read tensors from {path} ({exc}); check the file") from exc
            with handle:
                for name in group:
                    tensor = read_tensor(handle, self._where[name][1], path)
                    require_finite(tensor, name, str(path))
                    yield name, tensor
