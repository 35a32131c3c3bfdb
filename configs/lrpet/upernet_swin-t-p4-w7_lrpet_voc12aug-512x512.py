# UPerNet with a Swin-T backbone on VOC12 + SBD aug, trained with LRPET: ranks chosen so the
# factorized Swin-T backbone has 30 % fewer FLOPs at 3x512x512 (the paper's segmentation
# setting), a projection every 500 iterations (about one VOC12aug epoch at batch 16, as the
# PSPNet config). The projected layers are the backbone's linear layers (window-attention
# qkv / proj, the FFN layers, the patch-merging reductions), never BN-rectified (a LayerNorm
# precedes each, none follows).
#
# The model and optimizer are mmseg's
# mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py; the data
# and the 20k schedule are switched to VOC12aug (21 classes) the way
# mmseg::pspnet/pspnet_r50-d8_4xb4-20k_voc12aug-512x512.py does, by its _base_ files (the ADE20K
# config's dataset base cannot be overridden by a second dataset base: mmengine refuses
# duplicate keys among bases). The warm-up and poly decay are the Swin config's, ending at 20k.
#
#   python $MMSEG/.mim/tools/train.py configs/lrpet/upernet_swin-t-p4-w7_lrpet_voc12aug-512x512.py
_base_ = [
    'mmseg::_base_/models/upernet_swin.py', 'mmseg::_base_/datasets/pascal_voc12_aug.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_20k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
checkpoint_file = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/swin/swin_tiny_patch4_window7_224_20220317-1cdeb081.pth'  # noqa
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        use_abs_pos_embed=False,
        drop_path_rate=0.3,
        patch_norm=True),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=21),
    auxiliary_head=dict(in_channels=384, num_classes=21))

# AdamW optimizer, no weight decay for position embedding & layer norm in backbone
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=20000, by_epoch=False)
]

# By default, models are trained on 8 GPUs with 2 images per GPU (as the Swin config)
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader

custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
# flops_reduction=0.3 (the paper's segmentation setting): square C x C layers (attention proj)
# only pay below rank C/2, so a uniform ratio reaches it at about half rank. rank_multiple=8:
# Swin-T's widths are multiples of 8 and so stay the ranks. frozen='skip' (the default, stated
# here): frozen_stages=-1, every backbone linear layer is trainable. The patch-embedding conv
# (no BatchNorm after it) is left alone (unpaired='skip', logged).
custom_hooks = [dict(type='LRPETHook', flops_reduction=0.3, interval=500, rank_multiple=8,
                     frozen='skip')]
