"""``LRPETFactorized``: a registered builder for a compact (factorized) model component.

The factorize tool writes a config whose ``model.backbone`` (or any other top-level component
that held projected convs) is::

    dict(type='LRPETFactorized',
         module=<the original component config>,
         ranks={'layer1.0.conv1': 32, ...},          # names relative to the backbone
         folded_norms={'layer1.0.conv1': 'layer1.0.bn1', ...},
         merged=['layer4.0.conv2', ...])              # optional, see below

Building it builds the original component (in the current default scope, so mmdet's or mmseg's
``ResNet`` or ``SwinTransformer``), then replaces each listed conv by an (uninitialized)
:class:`LowRankConv2d` of the given rank, each listed linear layer by a :class:`LowRankLinear`,
and each folded BN by ``nn.Identity``. ``merged`` lists the layers the latency-aware merge of
``tools/deploy.py`` put back into one dense layer (measured faster than their low-rank pair):
each becomes a conv with bias (its BN stays folded into it) or a linear layer, keys
``<conv>.weight`` / ``<conv>.bias``. The compact checkpoint's keys
(``<conv>.0.weight``, ``<conv>.1.weight``, ``<conv>.1.bias``) then match exactly, so the
upstream ``tools/test.py`` loads and evaluates it with no user code.
"""
from typing import Dict, List, Optional

from mmengine.registry import MODELS
from torch import nn

from ..lowrank.factorize import apply_factorized_structure


@MODELS.register_module()
def LRPETFactorized(module: dict, ranks: Dict[str, int],
                    folded_norms: Optional[Dict[str, str]] = None,
                    merged: Optional[List[str]] = None, **extra) -> nn.Module:
    """Build ``module`` and give it the factorized structure (see the module docstring).

    ``extra`` keyword arguments (e.g. the ``train_cfg``/``test_cfg`` a detector injects into
    its heads) are passed on to ``module``.
    """
    if not isinstance(module, dict) or 'type' not in module:
        raise TypeError(f'module must be a config dict with a type, got {module!r}')
    return apply_factorized_structure(MODELS.build(dict(module, **extra)), ranks, folded_norms,
                                      merged)
