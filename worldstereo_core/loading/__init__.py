"""Weight loading: checkpoint files -> models, strictly checked.

* :mod:`.safetensors_files`: safetensors headers and tensors, read one tensor at a time.
* :mod:`.strict`: the one key / shape checker and strict state-dict loading.
* :mod:`.wan_keys`: Wan2.1 transformer key names (original <-> diffusers).
* :mod:`.transformer`: a WorldStereo variant folder over its Wan2.1-I2V base -> transformer.
* :mod:`.components`: VAE, UMT5, CLIP and scheduler config from a diffusers Wan2.1-I2V folder.
* :mod:`.single_file`: the same parts from ComfyUI's single files.
"""
from .components import BaseComponents, check_widths, default_dtype, load_base_components
from .strict import check_keys, load_state_dict_strict
from .transformer import LoadReport, load_worldstereo_transformer

__all__ = [
    "BaseComponents",
    "LoadReport",
    "check_keys",
    "check_widths",
    "default_dtype",
    "load_base_components",
    "load_state_dict_strict",
    "load_worldstereo_transformer",
]
