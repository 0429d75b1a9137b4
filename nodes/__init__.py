"""ComfyUI nodes: thin adapters over worldstereo_core, one module per stage."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
