# PSPNet R-50-D8 on VOC12 + SBD aug trained with whole-model LRPET: ranks chosen so that the
# whole factorized segmentor has half the test-time FLOPs at 3x512x512 (backbone and decode
# head; the decode head's 3x3 4096->512 bottleneck alone is 43 % of PSPNet). The auxiliary
# FCN head only trains: it costs nothing at test time and is left alone, like conv_seg.
# Projected every 500 iterations, as the backbone-only config.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-20k_voc12aug-512x512.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
# scope='': the whole model; the decode head's convs have BatchNorm (SyncBN), so they get BN
# rectification like the backbone's. rank_multiple=8: ranks that convolution kernels run fast.
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.5, interval=500, scope='',
                     rank_multiple=8, frozen='skip')]
