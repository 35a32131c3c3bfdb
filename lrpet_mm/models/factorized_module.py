"""``LRPETFactorized``: a registered builder for a compact (factorized) model component.

The factorize tool writes a config whose ``model.backbone`` (or any other top-level component
that held projected convs) is::

    dict(type='LRPETFactorized',
         module=<the original component config>,
         ranks={'layer1.0.conv1': 32, ...},          # names relative to the backbone
         folded_norms={'layer1.0.conv1': 'layer1.0.bn1', ...})

Building it builds the original component (in the current default scope, so mmdet's or mmseg's
``ResNet``), then replaces each listed conv by an (uninitialized) :class:`LowRankConv2d` of the
given rank and each folded BN by ``nn.Identity``. The compact checkpoint's keys
(``<conv>.0.weight``, ``<conv>.1.weight``, ``<conv>.1.bias``) then match exactly, so the
upstream ``tools/test.py`` loads and evaluates it with no user code.
"""
from typing import Dict, Optional

from mmengine.registry import MODELS
from torch import nn

from ..lowrank.factorize import LowRankConv2d


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (must exist) by ``module``."""
    parent_name, _, child = name.rpartition('.')
    parent = root.get_submodule(parent_name) if parent_name else root
    if not hasattr(parent, child):
        raise AttributeError(f'{type(root).__name__} has no submodule {name!r}')
    setattr(parent, child, module)


def empty_factorized_conv(conv: nn.Conv2d, rank: int) -> LowRankConv2d:
    """A :class:`LowRankConv2d` with the geometry :func:`factorize_conv` gives ``conv``."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise ValueError(f'cannot factorize {conv!r}: only Conv2d with groups=1')
    if not 1 <= rank <= min(conv.out_channels, conv.weight[0].numel()):
        raise ValueError(f'rank {rank} out of range for {conv!r}')
    reduce = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, bias=False,
                       padding_mode=conv.padding_mode)
    expand = nn.Conv2d(rank, conv.out_channels, 1, bias=True)
    return LowRankConv2d(reduce, expand)


def apply_factorized_structure(module: nn.Module, ranks: Dict[str, int],
                               folded_norms: Optional[Dict[str, str]] = None) -> nn.Module:
    """Swap convs for low-rank pairs and folded BNs for identities, in place; returns module."""
    for name, rank in ranks.items():
        try:
            conv = module.get_submodule(name)
        except AttributeError:
            raise KeyError(f'factorized layer {name!r} does not exist in '
                           f'{type(module).__name__}') from None
        set_submodule(module, name, empty_factorized_conv(conv, int(rank)))
    for conv_name, norm_name in (folded_norms or {}).items():
        if conv_name not in ranks:
            raise KeyError(f'folded norm {norm_name!r} belongs to {conv_name!r}, which is not '
                           'factorized')
        set_submodule(module, norm_name, nn.Identity())
    return module


@MODELS.register_module()
def LRPETFactorized(module: dict, ranks: Dict[str, int],
                    folded_norms: Optional[Dict[str, str]] = None, **extra) -> nn.Module:
    """Build ``module`` and give it the factorized structure (see the module docstring).

    ``extra`` keyword arguments (e.g. the ``train_cfg``/``test_cfg`` a detector injects into
    its heads) are passed on to ``module``.
    """
    if not isinstance(module, dict) or 'type' not in module:
        raise TypeError(f'module must be a config dict with a type, got {module!r}')
    return apply_factorized_structure(MODELS.build(dict(module, **extra)), ranks, folded_norms)
