# The toy CPU UPerNet with a tiny Swin backbone (built-in VOC-layout data) trained with LRPET:
# ranks for 30 % fewer backbone FLOPs at the 128x128 crop, a projection every 10 iterations.
_base_ = './upernet_swin_toy_voc12aug.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.3, interval=10)]
