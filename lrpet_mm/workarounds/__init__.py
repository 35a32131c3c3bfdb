"""Workarounds for bugs/limitations of dependencies (named after what they work around).

``cpu_distributed`` holds the functions (used by the engine's ``LRPETDDP``); the module
``mmengine_cpu_dist`` acts on import, so a config opts in through ``custom_imports``.
"""
