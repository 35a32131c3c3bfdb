# UPerNet with a tiny Swin backbone on the built-in synthetic VOC data: a CPU-sized toy of
# configs/lrpet/upernet_swin-t-p4-w7_lrpet_voc12aug-512x512.py (mmseg's SwinTransformer and
# UPerHead as in mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py,
# but 32 channels, two blocks per stage, 4x4 windows for 128x128 crops, narrow heads, plain BN
# instead of SyncBN, no pretrained weights). Data, crops and schedule are the PSPNet toy's.
#
# Make the data first:  python tools/make_voc_data.py --data-root data/VOCdevkit
# Train:                python .venv/lib/python3.11/site-packages/mmseg/.mim/tools/train.py \
#                           configs/lrpet/_toy_/upernet_swin_toy_voc12aug.py
_base_ = './pspnet_r18-d8_toy_voc12aug.py'

norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN upstream; plain BN runs anywhere
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        pretrain_img_size=128,
        embed_dims=32,
        patch_size=4,
        window_size=4,
        mlp_ratio=4,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8],
        strides=(4, 2, 2, 2),
        out_indices=(0, 1, 2, 3),
        qkv_bias=True,
        patch_norm=True,
        drop_path_rate=0.1,
        use_abs_pos_embed=False,
        act_cfg=dict(type='GELU'),
        norm_cfg=dict(type='LN', requires_grad=True),
        init_cfg=None),  # upstream: ImageNet Swin-T weights (no download here)
    decode_head=dict(
        _delete_=True,
        type='UPerHead',
        in_channels=[32, 64, 128, 256],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=64,
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        _delete_=True,
        type='FCNHead',
        in_channels=128,
        in_index=2,
        channels=32,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)))

# As mmseg's Swin configs: AdamW, no weight decay on the position tables and norms.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0002, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
