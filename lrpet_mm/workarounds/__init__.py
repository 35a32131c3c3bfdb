"""Workarounds for bugs/limitations of dependencies (named after what they work around).

Nothing here is imported by ``import lrpet_mm``; a config opts in through ``custom_imports``.
"""
