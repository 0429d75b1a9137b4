"""Tiny, randomly initialised Wan2.1-I2V base parts written in the real diffusers layout.

``write_tiny_base(folder)`` fills ``folder`` with ``text_encoder/`` (UMT5, token embedding stored
only as ``shared.weight`` with ``tie_word_embeddings=false``, as Wan's checkpoints are),
``tokenizer/`` (a character-level WordLevel tokenizer wrapped in PreTrainedTokenizerFast),
``image_encoder/`` + ``image_processor/`` (CLIP vision), ``vae/`` (AutoencoderKLWan),
``scheduler/`` (UniPC flow matching) and ``model_index.json``. The transformer/ folder is written
by tests/tiny_checkpoints.py; the dimensions here must match it (``text_dim`` = UMT5 d_model,
``image_dim`` = CLIP hidden size). Everything is built offline in well under a second.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file

#: The widths of tests/tiny_checkpoints.tiny_transformer_config; a base for another transformer (e.g.
#: a reference_tiny fixture) passes that transformer's own text_dim / image_dim.
TEXT_DIM = 32
IMAGE_DIM = 40
CLIP_IMAGE_SIZE = 28
CLIP_PATCH_SIZE = 14
FLOW_SHIFT = 5.0

_SPECIALS = ("<pad>", "</s>", "<unk>")


def _write_tokenizer(folder: Path) -> int:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(list(_SPECIALS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(str(folder))
    return len(vocab)


def _write_text_encoder(folder: Path, vocab_size: int, text_dim: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab_size, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = UMT5EncoderModel(cfg)
    model.encoder.embed_tokens = model.shared
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    folder.mkdir(parents=True, exist_ok=True)
    cfg.architectures = ["UMT5EncoderModel"]
    cfg.save_pretrained(str(folder))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write_clip(encoder_dir: Path, processor_dir: Path, image_dim: int) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=2 * image_dim, projection_dim=8,
                           num_hidden_layers=3, num_attention_heads=2, image_size=CLIP_IMAGE_SIZE,
                           patch_size=CLIP_PATCH_SIZE)
    CLIPVisionModel(cfg).save_pretrained(str(encoder_dir))
    # The base repo's processor is the standard one (do_rescale true); the pipeline overrides it.
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                       crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
                       do_center_crop=True, resample=3, do_rescale=True,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(str(processor_dir))


def _write_vae(folder: Path) -> None:
    from diffusers import AutoencoderKLWan

    AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0).save_pretrained(str(folder))


def _write_scheduler(folder: Path, flow_shift: float) -> None:
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                            flow_shift=flow_shift, solver_order=2, solver_type="bh2", predict_x0=True,
                            lower_order_final=True, final_sigmas_type="zero").save_pretrained(str(folder))


def write_tiny_base(folder: str | Path, *, text_dim: int = TEXT_DIM, image_dim: int = IMAGE_DIM,
                    flow_shift: float = FLOW_SHIFT, seed: int = 0) -> Path:
    """Write the tiny non-transformer parts of a Wan2.1-I2V diffusers repo into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocab_size = _write_tokenizer(folder / "tokenizer")
        _write_text_encoder(folder / "text_encoder", vocab_size, text_dim)
        _write_clip(folder / "image_encoder", folder / "image_processor", image_dim)
        _write_vae(folder / "vae")
    _write_scheduler(folder / "scheduler", flow_shift)
    index = {
        "_class_name": "WanImageToVideoPipeline",
        "image_encoder": ["transformers", "CLIPVisionModel"],
        "image_processor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# ------------------------------------------------------------------------------------------------
# The golden reference_tiny fixtures (shared by the conditioning, pipeline and later CLI/node tests)
# ------------------------------------------------------------------------------------------------
def reference_tiny_dirs(root: Path, kind_prefix: str) -> list[Path]:
    """Folders under ``root`` whose config.json ``fixture_kind`` starts with ``kind_prefix``
    (empty when ``root`` is absent)."""
    if not root.is_dir():
        return []
    found = []
    for cfg in sorted(root.glob("*/config.json")):
        try:
            kind = json.loads(cfg.read_text()).get("fixture_kind", "")
        except ValueError:
            continue
        if kind.startswith(kind_prefix):
            found.append(cfg.parent)
    return found


def load_fixture_common(common_dir: Path) -> dict:
    """The tiny VAE, CLIP vision model and CLIP processor of ``reference_tiny/common``."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor

    from worldstereo_core.loading.components import clip_vision_from_state_dict, vae_from_state_dict

    read = lambda name: json.loads((common_dir / name).read_text())  # noqa: E731
    return {
        "vae": vae_from_state_dict(read("vae_config.json"), load_file(str(common_dir / "vae.safetensors"))),
        "clip": clip_vision_from_state_dict(read("clip_vision_config.json"),
                                            load_file(str(common_dir / "clip_vision.safetensors"))),
        "processor": CLIPImageProcessor(**read("clip_image_processor.json")),
    }
