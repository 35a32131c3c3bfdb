"""Apply LRPET's projection (LRP + optional ET + optional BNR) to a model's targeted convs."""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .batchnorm import BNR_EPS, bn_scale, fold_bn_scale, unfold_bn_scale
from .projection import ProjectionError, conv_weight_as_matrix, project_low_rank
from .ranks import RankPlan
from .targets import ConvTarget


@dataclass
class ProjectionStats:
    """What one projection pass did.

    Attributes:
        num_layers: layers projected.
        energy_kept: ``{layer: ‖P_k(W)‖²/‖W‖²}`` before energy transfer (of the BN-folded
            weight where BNR is on).
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
    """Projects each target conv's weight onto its planned rank, in place.

    For a target with BN rectification the BN-folded weight W' = ΓW is projected and the
    conv weight recovered with paper eq. 16; otherwise W itself is projected. Weights are
    overwritten with ``copy_`` so parameters, gradients and optimizer state keep their
    identity, shape, dtype and device.

    Args:
        targets: the convs (see :func:`~lrpet_mm.lowrank.targets.select_targets`).
        plan: ranks; targets not in ``plan.layers`` are left alone.
        energy_transfer: rescale kept singular values to preserve ‖·‖_F. Defaults to True.
        bnr_eps: ε of eq. 16. Defaults to 1e-5.
    """

    def __init__(self, targets: List[ConvTarget], plan: RankPlan,
                 energy_transfer: bool = True, bnr_eps: float = BNR_EPS) -> None:
        self.targets = [t for t in targets if t.name in plan.layers]
        self.plan = plan
        self.energy_transfer = energy_transfer
        self.bnr_eps = bnr_eps
        missing = [name for name in plan.layers if name not in {t.name for t in targets}]
        if missing:
            raise ValueError(f'rank plan names layers that are not targets: {missing}')
        for t in self.targets:
            planned = plan.layers[t.name]
            if t.matrix_shape != (planned.out_features, planned.in_features):
                raise ValueError(
                    f'layer {t.name!r} has matrix shape {t.matrix_shape}, the rank plan '
                    f'expects {(planned.out_features, planned.in_features)}')

    def projected_weight(self, target: ConvTarget, where: str = '') -> Tuple[Tensor, float]:
        """Projected weight of one target (same shape/dtype/device) and the energy kept."""
        weight = target.conv.weight.detach()
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise ProjectionError(f'layer {target.name!r} has {bad} non-finite weight value(s)'
                                  f'{" at " + where if where else ""}; refusing to project')
        matrix = conv_weight_as_matrix(weight)
        rank = self.plan.rank_of(target.name)
        scale = None
        if target.rectify:
            scale = bn_scale(target.norm)
            if not torch.isfinite(scale).all():
                raise ProjectionError(f'BatchNorm {target.norm_name!r} of layer {target.name!r} '
                                      f'has non-finite scale{" at " + where if where else ""}')
            matrix = fold_bn_scale(matrix.to(scale.dtype), scale)
        try:
            result = project_low_rank(matrix, rank, self.energy_transfer)
        except ProjectionError as e:
            raise ProjectionError(f'layer {target.name!r}{" at " + where if where else ""}: {e}'
                                  ) from e
        projected = result.matrix
        if scale is not None:
            projected = unfold_bn_scale(projected, scale, self.bnr_eps)
        return projected.reshape(weight.shape).to(weight.dtype), result.energy_kept

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
            new_weight, energy = self.projected_weight(target, where)
            target.conv.weight.copy_(new_weight)
            stats.energy_kept[target.name] = energy
            stats.num_layers += 1
        stats.seconds = time.perf_counter() - start
        return stats

    def weights(self) -> Dict[str, nn.Parameter]:
        """``{layer name: weight parameter}`` of the planned targets."""
        return {t.name: t.conv.weight for t in self.targets}
