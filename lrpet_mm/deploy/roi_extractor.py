"""The multi-level RoI extractor of an ONNX Runtime deployment, without mmdeploy's ``ScatterND``.

mmdeploy 1.3.1's default rewrite of ``SingleRoIExtractor.forward`` (every backend without its
own) writes each feature level's RoI features into a zero tensor with ``roi_feats[inds] = ...``.
In ONNX that is one ``ScatterND`` per level, and ONNX Runtime's ``ScatterND`` copies the whole
(num_rois, 256, 7, 7) tensor each time: about 30 ms of a deployed Faster R-CNN R50 on 2 CPU
threads, a cost no rank changes (``benchmarks/results/inference_deployed.md``, op profile).

:func:`single_roi_extractor__forward__onnxruntime` computes the same numbers another way:
each level's RoIs are aligned as before (same ``RoiAlign`` node, same RoIs, same order within a
level), the level results are concatenated, and one ``Gather`` puts them back in the input
order. It is registered for the ``onnxruntime`` backend only, where mmdeploy prefers a
backend-specific rewriter to its default one; TensorRT keeps mmdeploy's multi-level op. It is
registered when :mod:`lrpet_mm.deploy.mmdeploy_export` deploys a model
(``tests/test_mmdeploy.py`` checks its output against mmdeploy's rewrite).
"""
import torch
from mmdeploy.core.optimizers import mark
from mmdeploy.core.rewriters import FUNCTION_REWRITER

#: the function mmdeploy's default rewriter replaces (same key, so ours takes precedence)
REWRITTEN = 'mmdet.models.roi_heads.SingleRoIExtractor.forward'


@mark('roi_extractor', inputs=['feats', 'rois'], outputs=['bbox_feats'])
@FUNCTION_REWRITER.register_rewriter(func_name=REWRITTEN, backend='onnxruntime')
def single_roi_extractor__forward__onnxruntime(self, feats, rois, roi_scale_factor=None):
    """RoI features (num_rois, C, out_h, out_w) of ``rois`` (num_rois, 5) from the feature
    levels ``feats``, in the input order of ``rois``.

    As in mmdeploy's default rewrite, two all-zero RoIs per level are put in front (so no
    level is ever empty, which ONNX Runtime's ``Reshape`` of a 0-sized tensor does not allow)
    and dropped at the end.
    """
    num_levels = len(feats)
    if num_levels == 1:
        return self.roi_layers[0](feats[0], rois)
    target_lvls = self.map_roi_levels(rois, num_levels)
    if roi_scale_factor is not None:
        rois = self.roi_rescale(rois, roi_scale_factor)
    num_pad = 2 * num_levels
    rois = torch.cat((rois.new_zeros(num_pad, 5), rois))
    levels = torch.arange(num_levels, dtype=target_lvls.dtype, device=target_lvls.device)
    target_lvls = torch.cat((levels, levels, target_lvls))
    level_feats, level_inds = [], []
    for i in range(num_levels):
        inds = (target_lvls == i).nonzero(as_tuple=False).squeeze(1)
        level_inds.append(inds)
        level_feats.append(self.roi_layers[i](feats[i], rois[inds]))
    # position of each RoI (input order) among the concatenated level results
    order = torch.cat(level_inds)
    position = torch.zeros_like(order).scatter(
        0, order, torch.arange(order.shape[0], dtype=order.dtype, device=order.device))
    return torch.cat(level_feats).index_select(0, position[num_pad:])
