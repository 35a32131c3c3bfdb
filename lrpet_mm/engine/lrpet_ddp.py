"""How a projection is distributed across ranks, and the model wrapper that splits it.

:class:`~lrpet_mm.engine.LRPETHook` decides *when* to project; *how* the work is spread over
the ranks of a data-parallel run is the model wrapper's job. The hook asks
:func:`projection_strategy` for the runner's model and calls what it gets:

* a wrapper that defines ``lrpet_project(projector, where)`` — :class:`LRPETDDP` — owns the
  distribution: it gives each rank a share of the layers, balanced by the SVD cost, and then
  broadcasts each projected weight from the rank that computed it, so all ranks end with
  bit-identical weights and the projection's wall time falls with the world size;
* any other model (plain, ``MMDistributedDataParallel``, FSDP-free single process) is
  projected by :func:`project_on_all_ranks`: every rank projects every layer and then takes
  rank 0's weights.

Use it in a config::

    model_wrapper_cfg = dict(type='LRPETDDP')

(extra keys go to ``MMDistributedDataParallel`` / ``torch.nn.parallel.DistributedDataParallel``,
e.g. ``find_unused_parameters=True``).
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from mmengine.dist import all_gather_object, broadcast, get_rank, get_world_size
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch import Tensor

from ..lowrank import LowRankProjector, ProjectionError, ProjectionStats
from ..lowrank.targets import LayerTarget
from ..workarounds.cpu_distributed import drop_cpu_device_ids


@dataclass
class DistributedProjectionStats(ProjectionStats):
    """:class:`ProjectionStats` of a projection split across ranks.

    ``num_layers``, ``energy_kept`` cover all layers (gathered from their owners); ``seconds``
    is this rank's wall time of the whole step (its share, the broadcasts and the gather).

    Attributes:
        world_size: number of ranks the work was split over.
        owners: ``{layer: rank that projected it}``.
        rank_seconds: per rank, the wall time of its own share (SVDs only).
        rank_layers: per rank, how many layers it projected.
    """
    world_size: int = 1
    owners: Dict[str, int] = field(default_factory=dict)
    rank_seconds: List[float] = field(default_factory=list)
    rank_layers: List[int] = field(default_factory=list)

    def split_summary(self) -> str:
        """E.g. ``' (split over 2 ranks by LRPETDDP: 27 layers 40.1 ms, 26 layers 39.7 ms)'``."""
        share = ', '.join(f'{n} layers {s * 1e3:.1f} ms'
                          for n, s in zip(self.rank_layers, self.rank_seconds))
        return f' (split over {self.world_size} ranks by LRPETDDP: {share})'


def projection_cost(target: LayerTarget) -> int:
    """Cost model of projecting one layer: m·n·min(m, n) for its (m, n) weight matrix (SVD)."""
    m, n = target.matrix_shape
    return m * n * min(m, n)


def assign_layers(targets: Sequence[LayerTarget], world_size: int) -> Dict[str, int]:
    """Assign each target to a rank, balancing :func:`projection_cost` (greedy LPT).

    Layers are taken by decreasing cost (ties by name) and each goes to the least loaded rank
    (ties to the lowest rank), so the result is deterministic: every rank computes the same
    assignment without communicating. With at least as many layers as ranks every rank gets
    at least one layer.

    Returns:
        ``{layer name: rank}``.
    """
    if world_size < 1:
        raise ValueError(f'world_size must be >= 1, got {world_size!r}')
    loads = [0] * world_size
    owners: Dict[str, int] = {}
    for target in sorted(targets, key=lambda t: (-projection_cost(t), t.name)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[target.name] = rank
        loads[rank] += projection_cost(target)
    return owners


def broadcast_coalesced(tensors: Iterable[Tensor], src: int) -> None:
    """Broadcast ``tensors`` in place from rank ``src``, one collective per dtype/device."""
    groups: Dict[tuple, List[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        broadcast(flat, src=src)
        if get_rank() != src:
            offset = 0
            with torch.no_grad():
                for tensor in group:
                    count = tensor.numel()
                    tensor.copy_(flat[offset:offset + count].view_as(tensor))
                    offset += count


def sync_projection_inputs(projector: LowRankProjector, src: int = 0) -> None:
    """Make the BatchNorms used by BN rectification identical to rank ``src``'s.

    mmengine wraps models with ``broadcast_buffers=False`` by default, so BN running statistics
    drift apart across ranks. BN rectification projects the BN-folded weight ΓW, so the result
    depends on the BN: without this, a layer's projected weight would depend on which rank
    projected it. With it, every rank (and every owner under :class:`LRPETDDP`) projects with
    rank 0's BN, the one saved in the checkpoint, and the split projection gives bit for bit
    the weights of the unsplit one. Parameters are synchronized by DDP already and are
    broadcast too only for certainty. No-op in a single process.
    """
    if get_world_size() <= 1:
        return
    tensors: List[Tensor] = []
    for target in projector.targets:
        if target.rectify and target.norm is not None:
            tensors.extend(target.norm.parameters(recurse=False))
            tensors.extend(b for b in target.norm.buffers(recurse=False) if b is not None)
    broadcast_coalesced(tensors, src)


@MODEL_WRAPPERS.register_module()
class LRPETDDP(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that splits LRPET's projections across ranks.

    Training, validation and testing behave exactly as with ``MMDistributedDataParallel``.
    When :class:`~lrpet_mm.engine.LRPETHook` projects, it calls :meth:`lrpet_project`: the
    planned layers are assigned to ranks balancing the SVD cost m·n·min(m, n)
    (:func:`assign_layers`), each rank projects only its share, and each weight is then
    broadcast from the rank that projected it. Every rank ends with bit-identical weights; the
    per-layer statistics are gathered so the hook logs all layers.

    On CPU the ``device_ids`` that mmengine's ``Runner.wrap_model`` passes by default
    (``[LOCAL_RANK]``) are dropped (:func:`~lrpet_mm.workarounds.cpu_distributed.\
drop_cpu_device_ids`).

    Args:
        module: the model.
        detect_anomalous_params (bool): see ``MMDistributedDataParallel``.
        **kwargs: passed to ``torch.nn.parallel.DistributedDataParallel``.
    """

    def __init__(self, module, detect_anomalous_params: bool = False, **kwargs) -> None:
        super().__init__(module=module, detect_anomalous_params=detect_anomalous_params,
                         **drop_cpu_device_ids(module, kwargs))

    @torch.no_grad()
    def lrpet_project(self, projector: LowRankProjector, where: str = ''
                      ) -> DistributedProjectionStats:
        """Project all planned layers of ``projector``, the work split across ranks.

        Must be called on every rank at the same point (it runs collectives).

        Raises:
            ProjectionError: on every rank if any rank's share failed (the message names the
                rank and the layer); other errors of a rank are re-raised on that rank and
                reported as RuntimeError on the others.
        """
        start = time.perf_counter()
        world_size, rank = get_world_size(), get_rank()
        owners = assign_layers(projector.targets, world_size)
        sync_projection_inputs(projector, src=0)

        error: Optional[BaseException] = None
        local = ProjectionStats(num_layers=0)
        try:
            local = projector.project(where=where,
                                      layer_filter=lambda t: owners[t.name] == rank)
        except Exception as e:  # report to the other ranks instead of leaving them waiting
            error = e
        report = dict(energy_kept=local.energy_kept, seconds=local.seconds,
                      num_layers=local.num_layers,
                      error=None if error is None else (type(error).__name__, str(error)))
        reports = all_gather_object(report)
        failed = [(r, rep['error']) for r, rep in enumerate(reports) if rep['error']]
        if failed:
            if error is not None:
                raise error
            r, (kind, message) = failed[0]
            text = f'LRPET projection failed on rank {r} ({kind}): {message}'
            raise ProjectionError(text) if kind == 'ProjectionError' else RuntimeError(text)

        if world_size > 1:
            weights = projector.weights()
            for src in range(world_size):
                broadcast_coalesced([weights[name].data for name, owner in owners.items()
                                     if owner == src], src)

        energy: Dict[str, float] = {}
        for rep in reports:
            energy.update(rep['energy_kept'])
        energy = {t.name: energy[t.name] for t in projector.targets if t.name in energy}
        return DistributedProjectionStats(
            num_layers=len(energy), energy_kept=energy,
            seconds=time.perf_counter() - start, world_size=world_size, owners=dict(owners),
            rank_seconds=[float(rep['seconds']) for rep in reports],
            rank_layers=[int(rep['num_layers']) for rep in reports])


def project_on_all_ranks(projector: LowRankProjector, where: str = '') -> ProjectionStats:
    """The default distribution: every rank projects every layer, then takes rank 0's weights.

    The BatchNorms used by BN rectification are first made identical to rank 0's (their
    running statistics are not synchronized by DDP under mmengine's default
    ``broadcast_buffers=False``), so all ranks end bit-identical. In a single process this is
    just ``projector.project``. Must be called on every rank at the same point.
    """
    sync_projection_inputs(projector, src=0)
    stats = projector.project(where=where)
    if get_world_size() > 1:
        broadcast_coalesced([w.data for w in projector.weights().values()], src=0)
    return stats


ProjectionStrategy = Callable[[LowRankProjector, str], ProjectionStats]


def projection_strategy(model) -> ProjectionStrategy:
    """How ``model`` (the runner's, possibly wrapped) wants its projections distributed: its
    own ``lrpet_project(projector, where)`` (:class:`LRPETDDP`), else
    :func:`project_on_all_ranks`."""
    own = getattr(model, 'lrpet_project', None)
    return own if callable(own) else project_on_all_ranks
