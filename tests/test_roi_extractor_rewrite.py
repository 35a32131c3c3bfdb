"""lrpet_mm.deploy.roi_extractor: the ONNX Runtime RoI extractor gives mmdet's RoI features,
in the input order, and is the rewriter mmdeploy picks for ONNX Runtime (not for TensorRT)."""
import pytest
import torch
from mmdeploy.codebase import import_codebase
from mmdeploy.core.rewriters import FUNCTION_REWRITER
from mmdeploy.core.rewriters.rewriter_utils import collect_env
from mmdeploy.utils import IR, Backend, Codebase
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

from lrpet_mm.deploy.roi_extractor import REWRITTEN, single_roi_extractor__forward__onnxruntime

STRIDES = (4, 8, 16, 32)


def extractor() -> SingleRoIExtractor:
    return SingleRoIExtractor(roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
                              out_channels=8, featmap_strides=list(STRIDES))


def random_rois(n: int, max_side: float, seed: int) -> torch.Tensor:
    """(n, 5) RoIs of image 0 with sides up to ``max_side`` pixels in a 256x256 image."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 128
    wh = 2 + torch.rand(n, 2, generator=g) * max_side
    return torch.cat([torch.zeros(n, 1), xy, xy + wh], dim=1)


def features(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 8, 256 // s, 256 // s, generator=g) for s in STRIDES]


@pytest.mark.parametrize('max_side, scale', [(250.0, None), (60.0, None), (250.0, 1.5)])
def test_rewrite_gives_mmdets_roi_features_in_input_order(max_side, scale):
    # max_side 60: every RoI maps to the finest level, the others are empty
    module, feats = extractor(), features()
    rois = random_rois(50, max_side, seed=1)
    levels = module.map_roi_levels(rois, len(STRIDES))
    if max_side < 100:
        assert set(levels.tolist()) == {0}
    else:
        assert len(set(levels.tolist())) >= 3
    with torch.no_grad():
        expected = module(feats, rois, roi_scale_factor=scale)
        got = single_roi_extractor__forward__onnxruntime(module, feats, rois,
                                                         roi_scale_factor=scale)
    assert got.shape == expected.shape == (50, 8, 7, 7)
    assert torch.equal(got, expected)


def test_rewrite_is_chosen_for_onnxruntime_and_not_for_tensorrt():
    import_codebase(Codebase.MMDET)  # registers mmdeploy's own rewriters, as torch2onnx does

    def chosen(backend: Backend):
        env = collect_env(backend, IR.ONNX)
        rewriter = dict(FUNCTION_REWRITER._registry.get_records(env))[REWRITTEN]['_object']
        return rewriter.__module__  # the registered function is the one under mmdeploy's mark

    assert chosen(Backend.ONNXRUNTIME) == 'lrpet_mm.deploy.roi_extractor'
    assert chosen(Backend.TENSORRT).startswith('mmdeploy.')
