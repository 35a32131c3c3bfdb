from .lrpet_hook import LRPETHook

__all__ = ['LRPETHook']
