"""The input shape (C, H, W) FLOPs are counted at: one rule for the hook, the planner, the
factorize / report / export tools — the shape given explicitly, else read from the config."""
import numbers
from typing import Optional, Sequence, Tuple


def check_input_shape(shape: Sequence[int], what: str = 'input shape') -> Tuple[int, int, int]:
    """(C, H, W) as three positive ints, or a ValueError naming ``what`` and the bad value."""
    values = tuple(shape) if isinstance(shape, (tuple, list)) else (shape, )
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                   and v > 0 for v in values):
        raise ValueError(f'{what} must be three positive integers (C, H, W), got {shape!r}')
    return tuple(int(v) for v in values)


def _find_resize_scale(pipeline) -> Tuple[int, int]:
    for step in pipeline or []:
        if isinstance(step, dict) and step.get('type') in ('Resize', 'mmdet.Resize',
                                                           'mmseg.Resize'):
            scale = step.get('scale')
            if isinstance(scale, (tuple, list)) and len(scale) == 2:
                return int(scale[0]), int(scale[1])
    return None


def infer_input_shape(cfg) -> Tuple[int, int, int]:
    """(C, H, W) for FLOPs counting: mmseg's ``crop_size`` (h, w), else the test pipeline's
    ``Resize`` scale (w, h) (mmdet VOC: (1000, 600) → (3, 600, 1000)).

    Raises:
        ValueError: neither is found; pass the shape explicitly.
    """
    crop = cfg.get('crop_size', None)
    if isinstance(crop, (tuple, list)) and len(crop) == 2:
        return 3, int(crop[0]), int(crop[1])
    pipelines = [cfg.get('test_pipeline', None)]
    test_loader = cfg.get('test_dataloader', None) or {}
    pipelines.append((test_loader.get('dataset') or {}).get('pipeline'))
    for pipeline in pipelines:
        scale = _find_resize_scale(pipeline)
        if scale is not None:
            width, height = scale
            return 3, height, width
    raise ValueError('cannot infer the input shape for FLOPs counting from the config (no '
                     'crop_size, no Resize in the test pipeline); give it explicitly as '
                     '(C, H, W)')


def resolve_input_shape(cfg, shape: Optional[Sequence[int]] = None,
                        what: str = 'input shape') -> Tuple[int, int, int]:
    """``shape`` validated when given, else :func:`infer_input_shape` of ``cfg``."""
    if shape is not None:
        return check_input_shape(shape, what)
    if cfg is None:
        raise ValueError(f'{what} is needed: give it explicitly as (C, H, W) or pass a config')
    return infer_input_shape(cfg)
