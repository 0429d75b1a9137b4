"""worldstereo_core.geometry"""
