# The toy CPU Faster R-CNN with a tiny Swin backbone (built-in VOC-layout data) trained with
# LRPET: ranks chosen so the factorized backbone has 30 % fewer FLOPs (counted at the config's
# test scale), one projection per epoch. The projected layers are the backbone's linear layers.
_base_ = './faster-rcnn_swin_fpn_toy_voc.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.3, interval=1)]
