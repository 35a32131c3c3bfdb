# Faster R-CNN with a Swin-T backbone on VOC07+12, trained with LRPET: ranks chosen so the
# factorized Swin-T backbone has 30 % fewer FLOPs (counted at 3x600x1000, the VOC test scale),
# projected once per epoch with energy transfer. The projected layers are the backbone's linear
# layers (window-attention qkv / proj, the FFN layers, the patch-merging reductions); a linear
# layer is never BN-rectified (a LayerNorm precedes it, none follows).
#
# The backbone is swapped in as mmdet's mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py does
# (same Swin-T settings, ImageNet weights, AdamW with no decay on position tables and norms,
# linear warm-up); the data and the 4-epoch (x3 repeats) schedule are the VOC config's.
#
#   python $MMDET/.mim/tools/train.py configs/lrpet/faster-rcnn_swin-t-p4-w7_fpn_lrpet_1x_voc0712.py
#   python tools/factorize.py configs/lrpet/faster-rcnn_swin-t-p4-w7_fpn_lrpet_1x_voc0712.py \
#       work_dirs/faster-rcnn_swin-t-p4-w7_fpn_lrpet_1x_voc0712/epoch_4.pth --work-dir DIR
_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'

pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth'  # noqa
model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

# As mmdet's Swin-T configs: AdamW, no weight decay on the position tables and norms, and a
# linear warm-up before the VOC config's step at epoch 3.
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=4, by_epoch=True, milestones=[3], gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }),
    optimizer=dict(
        _delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
# flops_reduction=0.3: a square C x C layer (attention proj) only pays at rank < C/2, qkv
# (3C x C) below 3C/4, the FFN layers (4C x C) below 4C/5, so a uniform ratio removes 30 % of
# the backbone FLOPs at about half rank (the paper's segmentation setting; its -50 % detection
# setting was measured on ResNets only). rank_multiple=8: Swin-T's widths are multiples of 8
# and so stay the ranks. frozen='skip' (the default, stated here): Swin's frozen_stages=-1, so
# every backbone linear layer is trainable. The patch-embedding conv (no BatchNorm after it)
# is left alone (unpaired='skip', logged).
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.3, interval=1, rank_multiple=8,
                     frozen='skip')]
