"""Apply LRPET's projection (LRP + optional ET + optional BNR) to a model's targeted convs and
linear layers."""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .batchnorm import BN_RECOVERIES, BNR_EPS, bn_scale, unfold_factor
from .projection import ProjectionError, conv_weight_as_matrix, project_low_rank
from .ranks import RankPlan
from .targets import LayerTarget


@dataclass
class ProjectionStats:
    """What one projection pass did.

    Attributes:
        num_layers: layers projected.
        energy_kept: ``{layer: ‖P_k(W)‖²/‖W‖²}`` before energy transfer (of the BN-folded
            weight where BNR is on; 1.0 where it is all zero).
        seconds: wall time of the pass.
    """
    num_layers: int
    energy_kept: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

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
    a the BN scale) is projected and the conv weight recovered as ``bn_recovery`` says; otherwise
    W itself is projected. Each projection is one exact truncated SVD
    (:func:`~lrpet_mm.lowrank.projection.project_low_rank`); nothing is kept between
    projections, so the projector has no state to save or restore. Weights are overwritten with
    ``copy_`` so parameters, gradients and optimizer state keep their identity, shape, dtype,
    device and memory format.

    BN recoveries (:data:`~lrpet_mm.lowrank.batchnorm.BN_RECOVERIES`):

    * ``'in_span'`` (default): W ← α·W·V_kV_kᵀ, V_k the top-k right singular vectors of ΓW and
      α = ‖ΓW‖_F / ‖ΓW·V_k‖_F (1 without energy transfer). Then ΓW_new = α·P_k(ΓW) exactly,
      rank(W_new) <= k, no ε, W → cW gives c·W_new, and a row with a_i = 0 keeps its part in
      span(V_k) (eq. 16 zeroes it for good). If every a_i = 0 (ΓW = 0), W itself is projected
      (with energy transfer on ‖W‖_F); the layer's energy kept is reported as 1.0.
    * ``'eq16'``: paper eq. 16, W ← (Γ² + εI)⁻¹ Γ·P̃_k(ΓW), i.e. row i of the projected
      folded weight scaled by a_i / (a_i² + ε) (ε = ``bnr_eps``).

    Args:
        targets: the convs and linear layers (see
            :func:`~lrpet_mm.lowrank.targets.select_targets`).
        plan: ranks; targets not in ``plan.layers`` are left alone.
        energy_transfer: rescale kept singular values to preserve ‖·‖_F. Defaults to True.
        bn_recovery: ``'in_span'`` or ``'eq16'``, see above. Defaults to ``'in_span'``.
        bnr_eps: ε of eq. 16 (``bn_recovery='eq16'`` only). Defaults to 1e-5.
    """

    def __init__(self, targets: List[LayerTarget], plan: RankPlan,
                 energy_transfer: bool = True, bn_recovery: str = 'in_span',
                 bnr_eps: float = BNR_EPS) -> None:
        if bn_recovery not in BN_RECOVERIES:
            raise ValueError(f'bn_recovery must be one of {BN_RECOVERIES}, got {bn_recovery!r}')
        missing = [name for name in plan.layers if name not in {t.name for t in targets}]
        if missing:
            raise ValueError(f'rank plan names layers that are not targets: {missing}')
        self.targets = [t for t in targets if t.name in plan.layers]
        self.plan = plan
        self.energy_transfer = energy_transfer
        self.bn_recovery = bn_recovery
        self.bnr_eps = bnr_eps
        for t in self.targets:
            planned = plan.layers[t.name]
            if t.matrix_shape != (planned.out_features, planned.in_features):
                raise ValueError(
                    f'layer {t.name!r} has matrix shape {t.matrix_shape}, the rank plan '
                    f'expects {(planned.out_features, planned.in_features)}')

    def project_layer(self, target: LayerTarget, where: str = '') -> float:
        """Project one target's weight in place; returns the energy kept. The weight is only
        written once the projection succeeded (an error leaves it as it was)."""
        weight = target.layer.weight
        at = f' at {where}' if where else ''
        scale = unfold = None
        if target.rectify:
            scale = bn_scale(target.norm)
            if not bool(torch.isfinite(scale).all()):
                raise ProjectionError(f'BatchNorm {target.norm_name!r} of layer {target.name!r} '
                                      f'has non-finite scale{at}')
            if self.bn_recovery == 'eq16':
                unfold = unfold_factor(scale, self.bnr_eps)
        try:
            result = project_low_rank(
                conv_weight_as_matrix(weight.detach()), self.plan.rank_of(target.name),
                self.energy_transfer, row_scale=scale, output_row_factor=unfold,
                in_span=target.rectify and self.bn_recovery == 'in_span')
        except ProjectionError as e:
            bad = int((~torch.isfinite(weight.detach())).sum())
            if bad:
                raise ProjectionError(f'layer {target.name!r} has {bad} non-finite weight '
                                      f'value(s){at}; refusing to project') from e
            raise ProjectionError(f'layer {target.name!r}{at}: {e}') from e
        with torch.no_grad():
            weight.copy_(result.matrix.view(weight.shape))
        return result.energy_kept

    @torch.no_grad()
    def project(self, where: str = '',
                layer_filter: Optional[Callable[[LayerTarget], bool]] = None) -> ProjectionStats:
        """Project every planned target in place (only those ``layer_filter`` accepts, if
        given). ``where`` (e.g. ``'iteration 500'``) goes into error messages.

        Raises:
            ProjectionError: a weight or BN scale is NaN/Inf, or the SVD failed twice; the
                failing layer's weight is left unmodified.
        """
        start = time.perf_counter()
        stats = ProjectionStats(num_layers=0)
        for target in self.targets:
            if layer_filter is not None and not layer_filter(target):
                continue
            stats.energy_kept[target.name] = self.project_layer(target, where)
            stats.num_layers += 1
        stats.seconds = time.perf_counter() - start
        return stats

    def weights(self) -> Dict[str, nn.Parameter]:
        """``{layer name: weight parameter}`` of the planned targets."""
        return {t.name: t.layer.weight for t in self.targets}
