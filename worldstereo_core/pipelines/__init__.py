"""worldstereo_core.pipelines"""
