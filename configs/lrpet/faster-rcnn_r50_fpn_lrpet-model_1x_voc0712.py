# Faster R-CNN R-50 FPN on VOC07+12 trained with whole-model LRPET: ranks chosen so that the
# whole factorized detector has half the test-time FLOPs (backbone, FPN, RPN head and RoI
# head; counted at 3x600x1000, the VOC test scale, with the RPN's 1000 test proposals, as
# tools/report.py counts them). The backbone is only 39 % of this detector's FLOPs: a
# backbone-only budget can never make the whole detector 2x faster.
#
#   python $MMDET/.mim/tools/train.py configs/lrpet/faster-rcnn_r50_fpn_lrpet-model_1x_voc0712.py
#   python tools/factorize.py configs/lrpet/faster-rcnn_r50_fpn_lrpet-model_1x_voc0712.py \
#       work_dirs/faster-rcnn_r50_fpn_lrpet-model_1x_voc0712/epoch_4.pth \
#       --work-dir work_dirs/compact
_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
# scope='': the whole model. Projected: every trainable backbone conv (with BN rectification),
# the FPN lateral / output convs and the RPN conv (no BatchNorm: LRP + energy transfer, the
# bias goes to the second factor) and the RoI head's shared FCs. Left alone, with the reason
# logged: the predictors (rpn_cls/rpn_reg, fc_cls/fc_reg; predictors='project' would project
# them) and the frozen stem and layer1 (frozen_stages=1 upstream), whose FLOPs still count.
# rank_multiple=8: ranks that convolution kernels run fast (the budget is still met).
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.5, interval=1, scope='',
                     rank_multiple=8, frozen='skip')]
