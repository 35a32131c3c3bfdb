# The toy CPU Faster R-CNN (built-in VOC-layout data) trained with LRPET: the one hook line
# (plus the import that registers it) is all a user adds to an existing config.
_base_ = './faster-rcnn_r18_fpn_toy_voc.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5, interval=1)]
