"""worldstereo_core.tasks"""
