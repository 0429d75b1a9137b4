"""worldstereo_core.models"""
