# The toy CPU Faster R-CNN (built-in VOC-layout data) trained with LRPET at the paper's
# detection setting: ranks chosen so the factorized backbone has half the FLOPs (counted at the
# config's test scale), one projection per epoch. The hook line (plus the import that registers
# it) is all a user adds to an existing config.
_base_ = './faster-rcnn_r18_fpn_toy_voc.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.5, interval=1)]
