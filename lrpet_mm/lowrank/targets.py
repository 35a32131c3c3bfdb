"""Find the layers to project (plain convs and linear layers) and pair each conv with the norm
layer that consumes its output.

A plain ``nn.Linear`` (weight (out, in)) is projected like a conv's (m, n) matrix, with energy
transfer but never with BN rectification: in transformers a LayerNorm *precedes* it (none
consumes its output), so it is not subject to the ``unpaired`` policy either.

Conv pairing is structural, never by enumeration order:

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
#: Linear classes whose forward is ``F.linear(x, self.weight, self.bias)``: ``nn.Linear`` and
#: mmcv's ``wrappers.Linear`` (empty-tensor support), the latter by qualified name.
_PLAIN_LINEAR_TYPES = (nn.Linear, )
_PLAIN_LINEAR_QUALNAMES = {'mmcv.cnn.bricks.wrappers.Linear'}
#: ``nn.MultiheadAttention.out_proj``: its parent reads the weight directly (F.multi_head_
#: attention_forward) and never calls its forward, so it cannot be replaced by a pair.
_MHA_OUT_PROJ_QUALNAME = 'torch.nn.modules.linear.NonDynamicallyQuantizableLinear'

UNPAIRED_POLICIES = ('skip', 'project', 'error')
#: What :func:`select_targets` does with a conv whose weight does not require grad.
FROZEN_POLICIES = ('skip', 'project')
#: What :func:`select_targets` does with a head's final predictor (:data:`PREDICTOR_PATTERN`).
PREDICTOR_POLICIES = ('skip', 'project')
#: A head's final predictor, by the name OpenMMLab heads give it: mmdet ``rpn_cls`` /
#: ``rpn_reg``, ``fc_cls`` / ``fc_reg``, ``conv_cls`` / ``conv_reg`` / ``conv_centerness``,
#: ``retina_cls`` / ``retina_reg``, ``conv_logits`` (mask heads), YOLOX
#: ``multi_level_conv_cls.0`` / ``..._obj.0``; mmseg ``conv_seg``. Projecting a predictor
#: confines its class scores (or box deltas) to a rank-k subspace, for a small share of the
#: FLOPs, so predictors are left alone by default.
PREDICTOR_PATTERN = r'(^|[._])(cls|reg|seg|logits|centerness|obj|objectness)(\.\d+)?$'
PREDICTOR_REASON = ("final predictor (class / box / segmentation output): projecting it "
                    "would confine its outputs to a rank-k subspace, for a small share of the "
                    "FLOPs; predictors='project' projects it")


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


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or any subclass (so it gets a logged decision, not silence)."""
    return isinstance(module, nn.Linear)


def layer_kind(module: nn.Module) -> str:
    """``'linear'`` for a linear-like layer, ``'conv'`` otherwise."""
    return 'linear' if is_linear_like(module) else 'conv'


def grouped_conv_reason(module: nn.Module) -> str:
    """Why a grouped conv is left alone, with its per-group matrix and break-even rank."""
    groups = module.groups
    m = module.weight.shape[0] // groups  # out / groups
    n = module.weight[0].numel()  # in / groups · kh · kw
    k_max = (m * n - 1) // (m + n)  # the largest k with k·(m + n) < m·n
    pays = (f'factorizing a group at rank k saves parameters only when k·(m + n) < m·n, i.e. '
            f'k <= {k_max} here' if k_max >= 1 else 'no rank saves parameters here')
    return (f'grouped conv (groups={groups}): each group is a separate (out/groups) x '
            f'(in/groups·kh·kw) = {m} x {n} matrix of rank <= {min(m, n)}; {pays}; '
            'per-group factorization is not implemented')


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why a conv-like or linear-like module cannot be projected, or None if it can."""
    if is_linear_like(module):
        if type(module) in _PLAIN_LINEAR_TYPES or _qualname(module) in _PLAIN_LINEAR_QUALNAMES:
            return None
        if _qualname(module) == _MHA_OUT_PROJ_QUALNAME:
            return ('out_proj of nn.MultiheadAttention: the attention reads its weight directly '
                    'and never calls its forward, so it cannot be factorized')
        return (f'linear subclass {type(module).__name__} may transform its weight in forward '
                '(e.g. weight normalization); only plain nn.Linear is projected')
    if not (type(module) in _PLAIN_CONV_TYPES or _qualname(module) in _PLAIN_CONV_QUALNAMES):
        if isinstance(module, nn.Conv2d):
            return (f'conv subclass {type(module).__name__} may transform its weight in '
                    'forward (e.g. weight standardization); only plain Conv2d is projected')
        return (f'unsupported layer type {type(module).__name__} (only plain Conv2d and '
                'nn.Linear are projected)')
    if module.groups != 1:
        return grouped_conv_reason(module)
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
class LayerTarget:
    """A layer to project: a conv or a linear layer.

    Attributes:
        name: module name relative to the model.
        layer: the ``nn.Conv2d`` (weight (n_out, n_in, kh, kw)) or ``nn.Linear`` (weight
            (out, in)); its weight is projected in place.
        norm_name: name of the BatchNorm consuming its output, or None (always None for a
            linear layer).
        norm: that BatchNorm, or None.
        rectify: whether BN rectification is applied (True only for a conv with a paired BN).
    """
    name: str
    layer: nn.Module
    norm_name: Optional[str]
    norm: Optional[nn.Module]
    rectify: bool

    @property
    def matrix_shape(self) -> Tuple[int, int]:
        weight = self.layer.weight
        return weight.shape[0], weight[0].numel()

    @property
    def kind(self) -> str:
        """``'conv'`` or ``'linear'``."""
        return layer_kind(self.layer)


@dataclass
class TargetSelection:
    """Result of :func:`select_targets`: the targets (model order) and the skipped layers with
    the reason for each."""
    targets: List[LayerTarget]
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


def is_predictor(name: str) -> bool:
    """Whether the layer ``name`` is a head's final predictor (:data:`PREDICTOR_PATTERN`)."""
    return re.search(PREDICTOR_PATTERN, name) is not None


def scope_components(model: nn.Module, scope: Union[None, str, Sequence[str]]) -> List[str]:
    """``scope`` as a list of module paths ('' = the whole model), each checked to exist in
    ``model``; a list must name distinct components, none inside another."""
    if scope is None or isinstance(scope, str):
        get_scope_module(model, scope)
        return [scope or '']
    components = list(scope)
    if not components or not all(isinstance(c, str) and c for c in components):
        raise ValueError(f'scope must be a module path or a non-empty list of component '
                         f'names, got {scope!r}')
    for component in components:
        get_scope_module(model, component)
    if len(set(components)) != len(components):
        raise ValueError(f'scope lists a component twice: {components}')
    for outer in components:
        for inner in components:
            if inner.startswith(f'{outer}.'):
                raise ValueError(f'scope lists {inner!r}, which is inside {outer!r}: '
                                 f'{components}')
    return components


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
                   scope: Union[None, str, Sequence[str]] = 'backbone',
                   include: Union[None, str, Sequence[str]] = None,
                   exclude: Union[None, str, Sequence[str]] = None,
                   bn_rectify: bool = True,
                   unpaired: str = 'skip', frozen: str = 'skip',
                   predictors: str = 'skip') -> TargetSelection:
    """Choose the layers to project (plain convs with ``groups=1`` and plain linear layers)
    and the BNs of the convs.

    A linear layer is never BN-rectified (``rectify=False``) and is not subject to
    ``unpaired``; include / exclude / ``frozen`` apply to it as to convs.

    Args:
        model: the (unwrapped) model.
        scope: dotted path of the submodule to search ('' or None: the whole model), or a
            list of such paths (e.g. ``['backbone', 'neck', 'rpn_head', 'roi_head']``).
            Defaults to ``'backbone'``.
        include: regexes (``re.search`` on the full module name); if given, only matching
            layers in scope are considered. Each pattern must match a conv or linear layer in
            scope.
        exclude: regexes removing layers; each must match a conv or linear layer in scope.
        bn_rectify: apply BN rectification to convs paired with a BatchNorm.
        unpaired: what to do, with ``bn_rectify=True``, with a conv whose output no BatchNorm
            consumes: ``'skip'`` (default; logged in ``skipped``), ``'project'`` (without BNR)
            or ``'error'``. A conv followed by a non-BN norm (GroupNorm, LayerNorm) raises an
            error unless ``unpaired='project'``.
        frozen: what to do with a layer whose weight does not require grad (a frozen stage,
            e.g. mmdet's ``frozen_stages=1``): ``'skip'`` (default; logged in ``skipped``:
            projecting it would truncate it once and it could never re-learn) or
            ``'project'``.
        predictors: what to do with a head's final predictor (:data:`PREDICTOR_PATTERN`,
            e.g. ``fc_cls``, ``rpn_reg``, ``conv_seg``): ``'skip'`` (default; logged in
            ``skipped``) or ``'project'``.

    Returns:
        :class:`TargetSelection`.
    """
    if unpaired not in UNPAIRED_POLICIES:
        raise ValueError(f'unpaired must be one of {UNPAIRED_POLICIES}, got {unpaired!r}')
    if frozen not in FROZEN_POLICIES:
        raise ValueError(f'frozen must be one of {FROZEN_POLICIES}, got {frozen!r}')
    if predictors not in PREDICTOR_POLICIES:
        raise ValueError(f'predictors must be one of {PREDICTOR_POLICIES}, got {predictors!r}')
    include = _as_patterns(include, 'include')
    exclude = _as_patterns(exclude, 'exclude')
    candidates = []
    for component in scope_components(model, scope):
        prefix = f'{component}.' if component else ''
        candidates += [(prefix + name if name else component, module)
                       for name, module in get_scope_module(model, component).named_modules()
                       if is_conv_like(module) or is_linear_like(module)]
    if not candidates:
        raise ValueError(f'no conv or linear layer found in scope {scope!r}')
    names = [name for name, _ in candidates]
    for what, patterns in (('include', include), ('exclude', exclude)):
        for p in patterns:
            if not any(re.search(p, name) for name in names):
                raise ValueError(f'{what} pattern {p!r} matches no conv or linear layer in '
                                 f'scope {scope!r} (e.g. {names[:4]})')

    pairs = find_conv_norm_pairs(model)
    targets: List[LayerTarget] = []
    skipped: Dict[str, str] = {}
    for name, conv in candidates:
        if include and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in exclude):
            skipped[name] = 'excluded by pattern'
            continue
        if predictors == 'skip' and is_predictor(name):
            skipped[name] = PREDICTOR_REASON
            continue
        reason = unsupported_reason(conv)
        if reason is not None:
            skipped[name] = reason
            continue
        if frozen == 'skip' and not conv.weight.requires_grad:
            skipped[name] = ("frozen (its weight does not require grad; frozen='project' "
                             'projects it anyway)')
            continue
        if is_linear_like(conv):  # no BN rectification: a LayerNorm precedes, none follows
            targets.append(LayerTarget(name, conv, None, None, rectify=False))
            continue
        norm_name = pairs.get(name)
        norm = model.get_submodule(norm_name) if norm_name else None
        if not bn_rectify:
            targets.append(LayerTarget(name, conv, norm_name, norm, rectify=False))
            continue
        if norm is not None and is_batch_norm(norm) and has_running_stats(norm):
            targets.append(LayerTarget(name, conv, norm_name, norm, rectify=True))
            continue
        if norm is not None:
            kind = type(norm).__name__ + (
                ' without running stats' if is_batch_norm(norm) else '')
            if unpaired != 'project':
                raise ValueError(
                    f'conv {name!r} is followed by {kind} {norm_name!r}: BN rectification '
                    "needs a BatchNorm with running stats. Set unpaired='project' to project "
                    'it without BN rectification, exclude it, or set bn_rectify=False')
            targets.append(LayerTarget(name, conv, norm_name, None, rectify=False))
            continue
        if unpaired == 'error':
            raise ValueError(f'conv {name!r}: no BatchNorm consumes its output '
                             "(unpaired='error')")
        if unpaired == 'skip':
            skipped[name] = ("no BatchNorm consumes its output (unpaired='skip'; "
                             "use unpaired='project' to project it without BNR)")
            continue
        targets.append(LayerTarget(name, conv, None, None, rectify=False))
    if not targets:
        raise ValueError(f'no conv or linear layer to project in scope {scope!r} after '
                         f'include/exclude; skipped: {skipped}')
    return TargetSelection(targets, skipped)
