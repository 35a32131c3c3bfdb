# The toy CPU Faster R-CNN trained with whole-model LRPET: ranks chosen so that the whole
# factorized detector (backbone, FPN, RPN head and RoI head, counted as the report counts
# them) has half the test-time FLOPs; the final predictors (rpn_cls/rpn_reg, fc_cls/fc_reg)
# are left alone. The hook line (plus the import that registers it) is all a user adds.
_base_ = './faster-rcnn_r18_fpn_toy_voc.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.5, interval=1, scope='')]
