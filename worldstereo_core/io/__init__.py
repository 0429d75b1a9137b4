"""worldstereo_core.io"""
