"""Stand-in for the ``comfy`` package (only ``model_management`` and ``utils``), for unit tests."""
