"""Find the convs to project and pair each with the norm layer that consumes its output.

Pairing is structural, never by enumeration order:

* a module with a ``normX_name`` attribute naming a child (mmdet/mmseg ``ResNet``
  ``BasicBlock``/``Bottleneck`` and the non-deep ResNet stem) pairs child ``convX`` with it;
  mmcv ``ConvModule`` (``norm_name``) pairs ``conv`` with it when its ``order`` puts the norm
  after the conv;
* inside an ``nn.Sequential`` a conv immediately followed by a norm is paired with it
  (``downsample.0``/``downsample.1``, ResNetV1d ``downsample.1``/``.2``, the V1c/V1d deep
  ``stem``).

A pair is kept only if the norm's channel count equals the conv's ``out_channels``.
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from .batchnorm import has_running_stats, is_batch_norm
from .ranks import compile_patterns

#: Conv classes whose forward is a plain convolution with ``self.weight``. mmcv's
#: ``wrappers.Conv2d`` (empty-tensor support) is accepted by qualified name so this module
#: stays free of OpenMMLab imports.
_PLAIN_CONV_TYPES = (nn.Conv2d, )
_PLAIN_CONV_QUALNAMES = {'mmcv.cnn.bricks.wrappers.Conv2d'}

UNPAIRED_POLICIES = ('skip', 'project', 'error')
#: What :func:`select_targets` does with a conv whose weight does not require grad.
FROZEN_POLICIES = ('skip', 'project')


def _qualname(module: nn.Module) -> str:
    return f'{type(module).__module__}.{type(module).__qualname__}'


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm, GroupNorm, LayerNorm, InstanceNorm and frozen BN variants."""
    return is_batch_norm(module) or isinstance(
        module, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
                 nn.LocalResponseNorm))


def is_conv_like(module: nn.Module) -> bool:
    """Anything that looks like a convolution (so it gets a logged decision, not silence)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return True
    weight = getattr(module, 'weight', None)
    return ('conv' in type(module).__name__.lower() and isinstance(weight, nn.Parameter)
            and weight.dim() >= 3)


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why a conv-like module cannot be projected, or None if it can."""
    if not (type(module) in _PLAIN_CONV_TYPES or _qualname(module) in _PLAIN_CONV_QUALNAMES):
        if isinstance(module, nn.Conv2d):
            return (f'conv subclass {type(module).__name__} may transform its weight in '
                    'forward (e.g. weight standardization); only plain Conv2d is projected')
        return f'unsupported layer type {type(module).__name__} (only plain Conv2d is projected)'
    if module.groups != 1:
        return f'grouped conv (groups={module.groups}) is not supported'
    return None


def find_conv_norm_pairs(model: nn.Module) -> Dict[str, str]:
    """Map ``conv module name -> norm module name`` for every structurally identified pair."""
    pairs: Dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        prefix = f'{parent_name}.' if parent_name else ''
        children = dict(parent.named_children())
        # Rule 1: `normX_name` attributes (mmdet/mmseg ResNet blocks and stem, mmcv ConvModule).
        for attr, value in vars(parent).items():
            match = re.fullmatch(r'norm(\d*)_name', attr)
            if not match or not isinstance(value, str) or value not in children:
                continue
            conv_attr = f'conv{match.group(1)}'
            if conv_attr not in children:
                continue
            order = getattr(parent, 'order', None)
            if (isinstance(order, (tuple, list)) and 'conv' in order and 'norm' in order
                    and order.index('norm') < order.index('conv')):
                continue  # pre-activation style ConvModule: the norm feeds the conv
            pairs[prefix + conv_attr] = prefix + value
        # Rule 2: conv immediately followed by a norm inside a Sequential.
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for first, second in zip(names, names[1:]):
                if is_conv_like(children[first]) and is_norm_layer(children[second]):
                    pairs.setdefault(prefix + first, prefix + second)
    return {conv: norm for conv, norm in pairs.items()
            if _channels_match(model.get_submodule(conv), model.get_submodule(norm))}


def _channels_match(conv: nn.Module, norm: nn.Module) -> bool:
    out_channels = getattr(conv, 'out_channels', None)
    if out_channels is None:
        return False
    for attr in ('num_features', 'num_channels'):
        if hasattr(norm, attr):
            return getattr(norm, attr) == out_channels
    shape = getattr(norm, 'normalized_shape', None)
    return bool(shape) and shape[0] == out_channels


@dataclass
class ConvTarget:
    """A conv to project.

    Attributes:
        name: module name relative to the model.
        conv: the ``nn.Conv2d``; its weight (n_out, n_in, kh, kw) is projected in place.
        norm_name: name of the BatchNorm consuming its output, or None.
        norm: that BatchNorm, or None.
        rectify: whether BN rectification is applied (True only with a paired BN).
    """
    name: str
    conv: nn.Module
    norm_name: Optional[str]
    norm: Optional[nn.Module]
    rectify: bool

    @property
    def matrix_shape(self) -> Tuple[int, int]:
        weight = self.conv.weight
        return weight.shape[0], weight[0].numel()


@dataclass
class TargetSelection:
    """Result of :func:`select_targets`: the targets (model order) and the skipped convs with
    the reason for each."""
    targets: List[ConvTarget]
    skipped: Dict[str, str]

    def shapes(self) -> Dict[str, Tuple[int, int]]:
        return {t.name: t.matrix_shape for t in self.targets}


def _as_patterns(patterns: Union[None, str, Sequence[str]], what: str) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f'{what} must be regex strings, got {p!r}')
    compile_patterns(patterns, what)
    return patterns


def get_scope_module(model: nn.Module, scope: Optional[str]) -> nn.Module:
    """The submodule at dotted path ``scope`` ('' or None = the model); clear error if absent."""
    if not scope:
        return model
    try:
        return model.get_submodule(scope)
    except AttributeError:
        children = [name for name, _ in model.named_children()]
        raise ValueError(f'scope {scope!r} does not exist in {type(model).__name__}; '
                         f'top-level modules: {children}') from None


def select_targets(model: nn.Module,
                   scope: Optional[str] = 'backbone',
                   include: Union[None, str, Sequence[str]] = None,
                   exclude: Union[None, str, Sequence[str]] = None,
                   bn_rectify: bool = True,
                   unpaired: str = 'skip', frozen: str = 'skip') -> TargetSelection:
    """Choose the convs to project and their BNs.

    Args:
        model: the (unwrapped) model.
        scope: dotted path of the submodule to search ('' or None: the whole model).
            Defaults to ``'backbone'``.
        include: regexes (``re.search`` on the full module name); if given, only matching
            convs in scope are considered. Each pattern must match a conv in scope.
        exclude: regexes removing convs; each must match a conv in scope.
        bn_rectify: apply BN rectification to convs paired with a BatchNorm.
        unpaired: what to do, with ``bn_rectify=True``, with a conv whose output no BatchNorm
            consumes: ``'skip'`` (default; logged in ``skipped``), ``'project'`` (without BNR)
            or ``'error'``. A conv followed by a non-BN norm (GroupNorm, LayerNorm) raises an
            error unless ``unpaired='project'``.
        frozen: what to do with a conv whose weight does not require grad (a frozen stage,
            e.g. mmdet's ``frozen_stages=1``): ``'skip'`` (default; logged in ``skipped``:
            projecting it would truncate it once and it could never re-learn) or
            ``'project'``.

    Returns:
        :class:`TargetSelection`.
    """
    if unpaired not in UNPAIRED_POLICIES:
        raise ValueError(f'unpaired must be one of {UNPAIRED_POLICIES}, got {unpaired!r}')
    if frozen not in FROZEN_POLICIES:
        raise ValueError(f'frozen must be one of {FROZEN_POLICIES}, got {frozen!r}')
    include = _as_patterns(include, 'include')
    exclude = _as_patterns(exclude, 'exclude')
    scope_module = get_scope_module(model, scope)
    prefix = f'{scope}.' if scope else ''
    candidates = [(prefix + name if name else scope or '', module)
                  for name, module in scope_module.named_modules() if is_conv_like(module)]
    if not candidates:
        raise ValueError(f'no conv layer found in scope {scope!r}')
    names = [name for name, _ in candidates]
    for what, patterns in (('include', include), ('exclude', exclude)):
        for p in patterns:
            if not any(re.search(p, name) for name in names):
                raise ValueError(f'{what} pattern {p!r} matches no conv in scope {scope!r} '
                                 f'(e.g. {names[:4]})')

    pairs = find_conv_norm_pairs(model)
    targets: List[ConvTarget] = []
    skipped: Dict[str, str] = {}
    for name, conv in candidates:
        if include and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in exclude):
            skipped[name] = 'excluded by pattern'
            continue
        reason = unsupported_reason(conv)
        if reason is not None:
            skipped[name] = reason
            continue
        if frozen == 'skip' and not conv.weight.requires_grad:
            skipped[name] = ("frozen (its weight does not require grad; frozen='project' "
                             'projects it anyway)')
            continue
        norm_name = pairs.get(name)
        norm = model.get_submodule(norm_name) if norm_name else None
        if not bn_rectify:
            targets.append(ConvTarget(name, conv, norm_name, norm, rectify=False))
            continue
        if norm is not None and is_batch_norm(norm) and has_running_stats(norm):
            targets.append(ConvTarget(name, conv, norm_name, norm, rectify=True))
            continue
        if norm is not None:
            kind = type(norm).__name__ + (
                ' without running stats' if is_batch_norm(norm) else '')
            if unpaired != 'project':
                raise ValueError(
                    f'conv {name!r} is followed by {kind} {norm_name!r}: BN rectification '
                    "needs a BatchNorm with running stats. Set unpaired='project' to project "
                    'it without BN rectification, exclude it, or set bn_rectify=False')
            targets.append(ConvTarget(name, conv, norm_name, None, rectify=False))
            continue
        if unpaired == 'error':
            raise ValueError(f'conv {name!r}: no BatchNorm consumes its output '
                             "(unpaired='error')")
        if unpaired == 'skip':
            skipped[name] = ("no BatchNorm consumes its output (unpaired='skip'; "
                             "use unpaired='project' to project it without BNR)")
            continue
        targets.append(ConvTarget(name, conv, None, None, rectify=False))
    if not targets:
        raise ValueError(f'no conv to project in scope {scope!r} after include/exclude; '
                         f'skipped: {skipped}')
    return TargetSelection(targets, skipped)
