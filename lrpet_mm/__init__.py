"""lrpet_mm: LRPET (low-rank projection with energy transfer) for OpenMMLab.

Importing the package registers :class:`~lrpet_mm.engine.LRPETHook` into mmengine's root
``HOOKS`` registry (so ``type='LRPETHook'`` works under any ``default_scope``). The pure
PyTorch core in :mod:`lrpet_mm.lowrank` is usable without OpenMMLab installed.
"""
__version__ = '0.1.0'

try:
    import mmengine  # noqa: F401
except ModuleNotFoundError as e:  # only the core is usable without mmengine
    if e.name != 'mmengine':
        raise
else:
    from . import engine, models  # noqa: F401  (registers LRPETHook, LRPETFactorized)
