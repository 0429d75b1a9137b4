"""worldstereo_core.memory"""
