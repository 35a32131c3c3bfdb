# Faster R-CNN R-50 FPN on VOC07+12 trained with LRPET at the paper's setting: ranks chosen so
# the factorized ResNet-50 backbone has half the FLOPs (counted at 3x600x1000, the VOC test
# scale), projected once per epoch with energy transfer and BN rectification.
#
#   python $MMDET/.mim/tools/train.py configs/lrpet/faster-rcnn_r50_fpn_lrpet_1x_voc0712.py
#   python tools/factorize.py configs/lrpet/faster-rcnn_r50_fpn_lrpet_1x_voc0712.py \
#       work_dirs/faster-rcnn_r50_fpn_lrpet_1x_voc0712/epoch_4.pth --work-dir work_dirs/compact
_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
# rank_multiple=8: every rank a multiple of 8 (the budget is still met), which convolution
# kernels run markedly faster than ranks like 26 or 105 (benchmarks/bench_rank_alignment.py).
# frozen='skip' (the default, stated here): the upstream config freezes the stem and layer1
# (frozen_stages=1); projecting them would truncate them once and they could never re-learn,
# so the -50 % budget is met with the trainable stages (the frozen FLOPs still count).
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.5, interval=1, rank_multiple=8,
                     frozen='skip')]
