# PSPNet R-50-D8 on VOC12 + SBD aug trained with LRPET at the paper's setting: ranks chosen so
# the factorized (dilated) ResNetV1c-50 backbone has 30 % fewer FLOPs at 3x512x512. The
# upstream schedule is iteration-based (20k iterations); the authors project about once per
# epoch of VOC12aug (10582 images at batch 16 ≈ 660 iterations), so every 500 iterations here.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-20k_voc12aug-512x512.py'

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
# rank_multiple=8: every rank a multiple of 8 (the budget is still met), which convolution
# kernels run markedly faster than ranks like 26 or 105 (benchmarks/bench_rank_alignment.py).
# frozen='skip' (the default, stated here): mmseg's ResNetV1c has no frozen stage
# (frozen_stages=-1), so every backbone conv is trainable and a target.
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.3, interval=500, rank_multiple=8,
                     frozen='skip')]
