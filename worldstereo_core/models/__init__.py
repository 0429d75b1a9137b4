"""WorldStereo transformers (GGM ControlNet + SSM memory on diffusers' Wan2.1); loading them is
:mod:`worldstereo_core.loading`.

Typical use::

    from worldstereo_core.loading import load_worldstereo_transformer
    model = load_worldstereo_transformer("models/worldstereo/worldstereo-camera",
                                         base="Wan2.1-I2V-14B-480P-Diffusers", dtype=torch.bfloat16, device="cuda")
    sample = model(hidden_states=..., timestep=..., encoder_hidden_states=..., encoder_hidden_states_image=...,
                   render_latent=..., render_mask=..., camera_embedding=..., return_dict=False)[0]
"""
from .config import ControlNetConfig, WorldStereoConfig, load_worldstereo_config, shipped_base_config
from .transformer import WorldStereoMemoryTransformer, WorldStereoTransformer, build_transformer

__all__ = [
    "ControlNetConfig",
    "WorldStereoConfig",
    "WorldStereoMemoryTransformer",
    "WorldStereoTransformer",
    "build_transformer",
    "load_worldstereo_config",
    "shipped_base_config",
]
