"""Loading the non-transformer parts from a diffusers-format Wan2.1-I2V base folder.

Layout (as in :data:`..hub.WAN_BASE_REPO`): ``text_encoder/`` + ``tokenizer/`` (UMT5),
``image_encoder/`` + ``image_processor/`` (CLIP ViT-H), ``vae/`` (AutoencoderKLWan) and
``scheduler/``. Weights load from safetensors only; nothing is fetched from a hub. Missing files
raise :class:`MissingWeightsError` naming the file, the folder and the download command.

Dtypes follow the reference: UMT5 and CLIP in float32; the VAE (and transformer) in bf16 on a
CUDA device that supports it, fp16 on older CUDA devices, float32 on CPU.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import CheckpointError, InputError, MissingWeightsError
from ..hub import WAN_BASE_REPO
from .safetensors_files import is_float_dtype, read_header, require_finite
from .strict import load_state_dict_strict

BASE_PARTS: tuple[str, ...] = ("text_encoder", "tokenizer", "image_encoder", "image_processor", "vae", "scheduler")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA with bf16 support, else fp16 on CUDA, else float32 (as the reference)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def _how_to_get(sub: str) -> str:
    return (f"download it with `hf download {WAN_BASE_REPO} --include \"{sub}/*\" --local-dir <base folder>` "
            f"(or put the whole diffusers repo under ComfyUI's models/diffusers/ folder)")


def _missing(path: Path, sub: str, what: str) -> MissingWeightsError:
    return MissingWeightsError(f"{what}: {path.name} not found in {path.parent}; {_how_to_get(sub)}")


def _require_file(folder: Path, sub: str, names: Iterable[str], what: str) -> Path:
    """The first of ``names`` present in ``folder`` (else MissingWeightsError on the first name)."""
    names = list(names)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise _missing(folder / names[0], sub, what)


def _require_weights(folder: Path, sub: str, stem: str, what: str) -> None:
    """``stem.safetensors`` or a complete sharded ``stem.safetensors.index.json`` in ``folder``."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{what}: {index} is not a valid safetensors index ({exc}); re-download it. "
                                  f"{_how_to_get(sub)}") from exc
        for shard in shards:
            if not (folder / shard).is_file():
                raise _missing(folder / shard, sub, what)
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise CheckpointError(f"{what}: {folder} holds only pickle weights (.bin/.pt); this pack loads "
                              f"safetensors only. {_how_to_get(sub)}")
    raise _missing(single, sub, what)


def _check_loaded(model: torch.nn.Module, folder: Path, what: str) -> None:
    """What ``from_pretrained`` lets through: integer tensors in the weight files (it would cast them;
    only CLIP's ``position_ids`` are integers) and NaN / inf in the loaded weights, named with the file."""
    for path in sorted(folder.glob("*.safetensors")):
        bad = [f"{n} ({e.dtype})" for n, e in read_header(path).items()
               if not is_float_dtype(e.dtype) and not n.endswith("position_ids")]
        if bad:
            raise CheckpointError(f"{what}: {path} stores weights as integers or booleans ({', '.join(bad[:5])}); "
                                  "this is not a weight file of this model (or it was damaged). "
                                  + _how_to_get(folder.name))
    for name, tensor in model.state_dict().items():
        require_finite(tensor, name, f"{what} in {folder}")


def _subfolder(base_dir: str | os.PathLike, sub: str, what: str) -> Path:
    base = Path(base_dir)
    if not base.is_dir():
        raise MissingWeightsError(f"{what}: base model folder {base} does not exist; "
                                  f"{_how_to_get(sub)}")
    folder = base / sub
    if not folder.is_dir():
        raise MissingWeightsError(f"{what}: folder {sub}/ not found in {base}; {_how_to_get(sub)}")
    return folder


def _from_pretrained(cls, base_dir: str | os.PathLike, sub: str, stem: str, what: str, **kwargs: Any):
    """``cls.from_pretrained`` on ``base_dir/sub`` (``config.json`` + ``stem`` safetensors weights, checked
    first and after loading, see :func:`_check_loaded`); ``kwargs`` (the dtype) go to ``from_pretrained``."""
    folder = _subfolder(base_dir, sub, what)
    _require_file(folder, sub, ("config.json",), what)
    _require_weights(folder, sub, stem, what)
    model = cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, **kwargs)
    _check_loaded(model, folder, what)
    return model


def load_tokenizer(base_dir: str | os.PathLike):
    """The UMT5 tokenizer from ``tokenizer/``."""
    from transformers import AutoTokenizer

    folder = _subfolder(base_dir, "tokenizer", "UMT5 tokenizer")
    _require_file(folder, "tokenizer", ("tokenizer.json", "spiece.model"), "UMT5 tokenizer")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tie_umt5_embeddings(text_encoder) -> None:
    """Make ``encoder.embed_tokens`` the ``shared`` embedding.

    Wan checkpoints store the token embedding only as ``shared.weight`` with
    ``tie_word_embeddings=false``; transformers >= 5 may then leave ``encoder.embed_tokens``
    untied (uninitialised). The reference re-ties it after loading; so do we.
    """
    text_encoder.encoder.embed_tokens = text_encoder.shared


def load_text_encoder(base_dir: str | os.PathLike, *, device: torch.device | str = "cpu"):
    """UMT5 encoder (float32, eval) from ``text_encoder/``."""
    from transformers import UMT5EncoderModel

    model = _from_pretrained(UMT5EncoderModel, base_dir, "text_encoder", "model", "UMT5 text encoder",
                             dtype=torch.float32)
    tie_umt5_embeddings(model)
    return model.to(device).eval().requires_grad_(False)


def load_image_processor(base_dir: str | os.PathLike):
    """The CLIP image processor from ``image_processor/`` (``do_rescale`` is chosen per call)."""
    from transformers import CLIPImageProcessor

    folder = _subfolder(base_dir, "image_processor", "CLIP image processor")
    _require_file(folder, "image_processor", ("preprocessor_config.json",), "CLIP image processor")
    return CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)


def load_image_encoder(base_dir: str | os.PathLike, *, device: torch.device | str = "cpu"):
    """CLIP vision model (float32, eval) from ``image_encoder/``."""
    from transformers import CLIPVisionModel

    model = _from_pretrained(CLIPVisionModel, base_dir, "image_encoder", "model", "CLIP image encoder",
                             dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def load_vae(base_dir: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """AutoencoderKLWan (eval) from ``vae/`` in ``dtype`` (default: :func:`default_dtype`)."""
    from diffusers import AutoencoderKLWan

    vae = _from_pretrained(AutoencoderKLWan, base_dir, "vae", "diffusion_pytorch_model", "Wan VAE",
                           torch_dtype=dtype or default_dtype(device))
    return vae.to(device).eval().requires_grad_(False)


def load_scheduler_config(base_dir: str | os.PathLike) -> dict[str, Any]:
    """The UniPC scheduler config dict from ``scheduler/scheduler_config.json``."""
    folder = _subfolder(base_dir, "scheduler", "UniPC scheduler config")
    path = _require_file(folder, "scheduler", ("scheduler_config.json",), "UniPC scheduler config")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download it. {_how_to_get('scheduler')}") from exc


def vae_from_state_dict(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                        source: str = "VAE weights", dtype: torch.dtype = torch.float32):
    """AutoencoderKLWan from a config dict (``_``-keys ignored) and a full state dict, strictly."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**{k: v for k, v in config.items() if not k.startswith("_")})
    load_state_dict_strict(vae, state_dict, source=source)
    if dtype != torch.float32:
        vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)


def clip_vision_from_state_dict(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                                source: str = "CLIP vision weights"):
    """CLIPVisionModel (float32) from a config dict and a state dict, strictly.

    Older transformers (e.g. 5.2, which wrote the fixtures) name the keys ``vision_model.*``;
    5.23 has no such prefix. Either spelling is accepted.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    model = CLIPVisionModel(cfg)
    own = set(model.state_dict())
    prefix = "vision_model."
    if not any(k.startswith(prefix) for k in own):
        state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    elif not any(k.startswith(prefix) for k in state_dict):
        state_dict = {prefix + k: v for k, v in state_dict.items()}
    load_state_dict_strict(model, state_dict, source=source)
    return model.float().eval().requires_grad_(False)


@dataclass
class BaseComponents:
    """The Wan2.1-I2V parts a WorldStereo pipeline needs besides its transformer."""

    vae: Any
    text_encoder: Any = None
    tokenizer: Any = None
    image_encoder: Any = None
    image_processor: Any = None
    scheduler_config: dict[str, Any] | None = None


def check_widths(transformer: torch.nn.Module, base: BaseComponents) -> None:
    """Raise InputError when the text / image encoder does not produce the widths the transformer's
    own config expects (``text_dim`` = UMT5 ``d_model``, ``image_dim`` = CLIP ``hidden_size``)."""
    config = getattr(transformer, "config", None)
    pairs = (("text encoder", base.text_encoder, "d_model", "text_dim"),
             ("CLIP image encoder", base.image_encoder, "hidden_size", "image_dim"))
    for what, model, width_field, dim_field in pairs:
        width = getattr(getattr(model, "config", None), width_field, None)
        expected = getattr(config, dim_field, None)
        if model is not None and width is not None and expected is not None and width != expected:
            raise InputError(f"the {what} gives {width}-wide features ({width_field}) but the transformer's config "
                             f"has {dim_field} {expected}: the {what} belongs to another base model; load the one "
                             "of the Wan2.1-I2V base the transformer was built from")


def load_base_components(base_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                         vae_dtype: torch.dtype | None = None, text: bool = True, image: bool = True,
                         scheduler: bool = True) -> BaseComponents:
    """Load VAE (+ text encoder/tokenizer, CLIP encoder/processor, scheduler config) from ``base_dir``.

    ``text=False`` skips UMT5 (when prompt embeddings come from elsewhere); ``image=False`` skips
    CLIP; ``scheduler=False`` skips the UniPC config (the DMD variant does not use it).
    """
    return BaseComponents(
        vae=load_vae(base_dir, device=device, dtype=vae_dtype),
        text_encoder=load_text_encoder(base_dir, device=device) if text else None,
        tokenizer=load_tokenizer(base_dir) if text else None,
        image_encoder=load_image_encoder(base_dir, device=device) if image else None,
        image_processor=load_image_processor(base_dir) if image else None,
        scheduler_config=load_scheduler_config(base_dir) if scheduler else None,
    )
