# The toy CPU PSPNet (built-in VOC-layout data) trained with LRPET.
_base_ = './pspnet_r18-d8_toy_voc12aug.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5, interval=10)]
