# Faster R-CNN with a tiny Swin backbone on the built-in synthetic VOC data: a CPU-sized toy of
# configs/lrpet/faster-rcnn_swin-t-p4-w7_fpn_lrpet_1x_voc0712.py (mmdet's SwinTransformer as in
# mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py, but 32 channels, two blocks per stage so
# the shifted windows are exercised, 4x4 windows for 160x128 images; no pretrained weights).
# Everything else (data, schedule, RoI settings) is the ResNet-18 toy's.
#
# Make the data first:  python tools/make_voc_data.py --data-root data/VOCdevkit
# Train:                python .venv/lib/python3.11/site-packages/mmdet/.mim/tools/train.py \
#                           configs/lrpet/_toy_/faster-rcnn_swin_fpn_toy_voc.py
_base_ = './faster-rcnn_r18_fpn_toy_voc.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        embed_dims=32,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8],
        window_size=4,
        mlp_ratio=4,
        qkv_bias=True,
        drop_path_rate=0.1,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        convert_weights=False,
        init_cfg=None),  # upstream: ImageNet Swin-T weights (no download here)
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=64), bbox_head=dict(in_channels=64)))

# As mmdet's Swin configs: AdamW, no weight decay on the position tables and norms.
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0002, betas=(0.9, 0.999),
                   weight_decay=0.05))
