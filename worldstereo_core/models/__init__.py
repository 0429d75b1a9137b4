"""WorldStereo transformers (GGM ControlNet + SSM memory on diffusers' Wan2.1) and strict loading.

Typical use::

    from worldstereo_core.models import load_worldstereo_transformer
    model = load_worldstereo_transformer("models/worldstereo/worldstereo-camera",
                                         base="Wan2.1-I2V-14B-480P-Diffusers", dtype=torch.bfloat16, device="cuda")
    sample = model(hidden_states=..., timestep=..., encoder_hidden_states=..., encoder_hidden_states_image=...,
                   render_latent=..., render_mask=..., camera_embedding=..., return_dict=False)[0]
"""
from .config import ControlNetConfig, WorldStereoConfig, load_worldstereo_config, shipped_base_config
from .loading import LoadReport, load_state_dict_strict, load_worldstereo_transformer
from .transformer import WorldStereoMemoryTransformer, WorldStereoTransformer, build_transformer

__all__ = [
    "ControlNetConfig",
    "LoadReport",
    "WorldStereoConfig",
    "WorldStereoMemoryTransformer",
    "WorldStereoTransformer",
    "build_transformer",
    "load_state_dict_strict",
    "load_worldstereo_config",
    "load_worldstereo_transformer",
    "shipped_base_config",
]
