# The toy CPU PSPNet trained with whole-model LRPET: ranks chosen so that the whole factorized
# segmentor (backbone and decode head; the auxiliary head only trains and costs nothing at
# test time) has half the test-time FLOPs; conv_seg is left alone. The hook line (plus the
# import that registers it) is all a user adds.
_base_ = './pspnet_r18-d8_toy_voc12aug.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.5, interval=10, scope='')]
