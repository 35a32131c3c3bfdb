"""Apply LRPET's projection (LRP + optional ET + optional BNR) to a model's targeted convs and
linear layers."""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .batchnorm import BN_RECOVERIES, BNR_EPS, bn_scale, unfold_factor
from .projection import PROJECTION_METHODS, ProjectionError, conv_weight_as_matrix, project_low_rank
from .ranks import RankPlan
from .subspace import warm_start_usable
from .targets import ConvTarget


@dataclass
class ProjectionStats:
    """What one projection pass did.

    Attributes:
        num_layers: layers projected.
        energy_kept: ``{layer: ‖P_k(W)‖²/‖W‖²}`` before energy transfer (of the BN-folded
            weight where BNR is on; 1.0 where it is all zero).
        seconds: wall time of the pass.
        methods: ``{layer: 'warm' | 'warm-f64' | 'exact-f32' | 'exact' | 'svd'}``, how each
            subspace was obtained (see
            :func:`~lrpet_mm.lowrank.projection.project_low_rank`).
    """
    num_layers: int
    energy_kept: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    methods: Dict[str, str] = field(default_factory=dict)

    @property
    def num_warm(self) -> int:
        """Layers whose warm-started subspace passed the residual certificate."""
        return sum(1 for m in self.methods.values() if m.startswith('warm'))

    @property
    def energy_kept_mean(self) -> float:
        values = list(self.energy_kept.values())
        return sum(values) / len(values) if values else 1.0

    @property
    def energy_kept_min(self) -> float:
        return min(self.energy_kept.values(), default=1.0)


class LowRankProjector:
    """Projects each target's weight (a conv's (n_out, n_in·kh·kw) matrix or a linear layer's
    (out, in) weight) onto its planned rank, in place.

    For a target with BN rectification (convs only) the BN-folded weight W' = ΓW (Γ = diag(a),
    a the BN scale) is projected and the conv weight recovered as ``bn_recovery`` says; otherwise W
    itself is projected. Weights are overwritten with ``copy_`` so parameters, gradients and
    optimizer state keep their identity, shape, dtype and device.

    BN recoveries (:data:`~lrpet_mm.lowrank.batchnorm.BN_RECOVERIES`):

    * ``'in_span'`` (default): W ← α·W·V_kV_kᵀ, V_k the top-k right singular vectors of ΓW and
      α = ‖ΓW‖_F / ‖ΓW·V_k‖_F (1 without energy transfer). Then ΓW_new = α·P_k(ΓW) exactly,
      rank(W_new) <= k, no ε, W → cW gives c·W_new, and a row with a_i = 0 keeps its part in
      span(V_k) (eq. 16 zeroes it for good). If every a_i = 0 (ΓW = 0), W itself is projected
      (with energy transfer on ‖W‖_F); the layer's energy kept is reported as 1.0.
    * ``'eq16'``: paper eq. 16, W ← (Γ² + εI)⁻¹ Γ·P̃_k(ΓW), i.e. row i of the projected
      folded weight scaled by a_i / (a_i² + ε) (ε = ``bnr_eps``).

    Only the top-k singular subspace of each weight is computed (no full SVD): exactly from
    the float64 Gram matrix of the smaller side the first time, then by one warm-started
    subspace iteration from the layer's previous basis, accepted only when its residual
    certificate bounds ‖W − P̂‖_F² within 1e-4 of the optimum (otherwise exact again); see
    :func:`~lrpet_mm.lowrank.projection.project_low_rank`. The cached bases ((s, k) per layer,
    s = min(m, n)) are state: :meth:`basis_state` / :meth:`load_basis_state`.

    Args:
        targets: the convs and linear layers (see
            :func:`~lrpet_mm.lowrank.targets.select_targets`).
        plan: ranks; targets not in ``plan.layers`` are left alone.
        energy_transfer: rescale kept singular values to preserve ‖·‖_F. Defaults to True.
        bnr_eps: ε of eq. 16 (``bn_recovery='eq16'`` only). Defaults to 1e-5.
        warm_start: reuse each layer's previous basis. Defaults to True. With False every
            projection uses the exact method.
        method: ``'auto'`` (default), ``'exact'`` or ``'svd'`` (full SVD, the slow
            reference); see :func:`~lrpet_mm.lowrank.projection.project_low_rank`.
        bn_recovery: ``'in_span'`` (default) or ``'eq16'``, see above.
    """

    def __init__(self, targets: List[ConvTarget], plan: RankPlan,
                 energy_transfer: bool = True, bnr_eps: float = BNR_EPS,
                 warm_start: bool = True, method: str = 'auto',
                 bn_recovery: str = 'in_span') -> None:
        if method not in PROJECTION_METHODS:
            raise ValueError(f'method must be one of {PROJECTION_METHODS}, got {method!r}')
        if bn_recovery not in BN_RECOVERIES:
            raise ValueError(f'bn_recovery must be one of {BN_RECOVERIES}, got {bn_recovery!r}')
        self.targets = [t for t in targets if t.name in plan.layers]
        self.plan = plan
        self.energy_transfer = energy_transfer
        self.bnr_eps = bnr_eps
        self.warm_start = bool(warm_start)
        self.method = method
        self.bn_recovery = bn_recovery
        self.bases: Dict[str, Tensor] = {}
        self.last_methods: Dict[str, str] = {}
        missing = [name for name in plan.layers if name not in {t.name for t in targets}]
        if missing:
            raise ValueError(f'rank plan names layers that are not targets: {missing}')
        for t in self.targets:
            planned = plan.layers[t.name]
            if t.matrix_shape != (planned.out_features, planned.in_features):
                raise ValueError(
                    f'layer {t.name!r} has matrix shape {t.matrix_shape}, the rank plan '
                    f'expects {(planned.out_features, planned.in_features)}')

    def project_layer(self, target: ConvTarget, where: str = '') -> float:
        """Project one target's weight in place; returns the energy kept.

        The weight is only written once the projection succeeded (an error leaves it as it
        was), in its own memory format: a weight whose (m, n) matrix is not a view of it
        (e.g. a channels_last 3×3 conv) is projected in a contiguous copy, then copied back.
        Updates the layer's cached basis (and :attr:`last_methods`)."""
        weight = target.conv.weight.detach()
        at = f' at {where}' if where else ''
        matrix = conv_weight_as_matrix(weight)
        is_view = matrix.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        rank = self.plan.rank_of(target.name)
        scale = unfold = None
        if target.rectify:
            scale = bn_scale(target.norm)
            if not torch.isfinite(scale).all():
                raise ProjectionError(f'BatchNorm {target.norm_name!r} of layer {target.name!r} '
                                      f'has non-finite scale{at}')
            if scale.dtype != matrix.dtype and matrix.dtype in (torch.float32, torch.float64):
                scale = scale.to(matrix.dtype)
            if self.bn_recovery == 'eq16':
                unfold = unfold_factor(scale, self.bnr_eps)
        warm = self.bases.get(target.name) if self.warm_start else None
        try:
            result = project_low_rank(matrix, rank, self.energy_transfer, warm_basis=warm,
                                      method=self.method, row_scale=scale,
                                      output_row_factor=unfold, out=matrix,
                                      float32_exact=self.last_methods.get(target.name)
                                      != 'exact',
                                      in_span=target.rectify and self.bn_recovery == 'in_span')
        except ProjectionError as e:
            bad = int((~torch.isfinite(weight)).sum())
            if bad:
                raise ProjectionError(f'layer {target.name!r} has {bad} non-finite weight '
                                      f'value(s){at}; refusing to project') from e
            raise ProjectionError(f'layer {target.name!r}{at}: {e}') from e
        if not is_view:
            weight.copy_(matrix.view(weight.shape))
        if result.basis is not None:
            self.bases[target.name] = result.basis.detach()
        self.last_methods[target.name] = result.method
        return result.energy_kept

    @torch.no_grad()
    def project(self, where: str = '',
                layer_filter: Optional[Callable[[ConvTarget], bool]] = None) -> ProjectionStats:
        """Project every planned target in place.

        Args:
            where: a description of the training position (e.g. ``'iteration 500'``), used in
                error messages.
            layer_filter: if given, only targets for which it returns True are projected.

        Raises:
            ProjectionError: a weight or BN scale is NaN/Inf, or the SVD failed twice. It is
                raised before any weight is modified by that layer.
        """
        start = time.perf_counter()
        stats = ProjectionStats(num_layers=0)
        for target in self.targets:
            if layer_filter is not None and not layer_filter(target):
                continue
            energy = self.project_layer(target, where)
            stats.energy_kept[target.name] = energy
            stats.methods[target.name] = self.last_methods[target.name]
            stats.num_layers += 1
        stats.seconds = time.perf_counter() - start
        return stats

    def basis_state(self, bases: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
        """``{layer: (s, k) basis}`` of the last projection of each layer (CPU copies); of
        ``bases`` instead when given (e.g. those kept aside during a validation-time
        projection)."""
        bases = self.bases if bases is None else bases
        return {name: basis.detach().cpu().clone() for name, basis in bases.items()}

    def load_basis_state(self, state: Dict[str, Tensor]) -> List[str]:
        """Adopt saved bases; returns the names that were dropped (not a planned layer, wrong
        shape or non-finite), which will use the exact method at their next projection."""
        dropped = []
        targets = {t.name: t for t in self.targets}
        self.bases = {}
        for name, basis in state.items():
            target = targets.get(name)
            shape = None if target is None else (min(target.matrix_shape),
                                                 self.plan.rank_of(name))
            if (target is None or not isinstance(basis, Tensor)
                    or not warm_start_usable(basis, *shape)):
                dropped.append(name)
                continue
            weight = target.conv.weight
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else None
            self.bases[name] = basis.to(device=weight.device, dtype=dtype or torch.float32)
        return dropped

    def weights(self) -> Dict[str, nn.Parameter]:
        """``{layer name: weight parameter}`` of the planned targets."""
        return {t.name: t.conv.weight for t in self.targets}
