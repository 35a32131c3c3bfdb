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
import atexit
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as torch_dist
from mmengine.dist import all_gather_object, broadcast, get_rank, get_world_size
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch import Tensor

from ..lowrank import LowRankProjector, ProjectionError, ProjectionStats
from ..lowrank.targets import ConvTarget


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


def projection_cost(target: ConvTarget) -> int:
    """Cost model of projecting one layer: m·n·min(m, n) for its (m, n) weight matrix (SVD)."""
    m, n = target.matrix_shape
    return m * n * min(m, n)


def assign_layers(targets: Sequence[ConvTarget], world_size: int) -> Dict[str, int]:
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


def broadcast_weights(projector: LowRankProjector, src: int = 0) -> None:
    """Every rank takes rank ``src``'s planned weights (bit-identical). No-op in one process."""
    if get_world_size() > 1:
        broadcast_coalesced([w.data for w in projector.weights().values()], src)


def broadcast_bases(projector: LowRankProjector, owners: Dict[str, int]) -> None:
    """Every rank takes each layer's warm-start basis from the rank that projected it.

    Keeps the bases identical on all ranks, so the checkpoint (saved by rank 0) holds every
    layer's basis and a resumed run warm-starts exactly as the uninterrupted one. A layer
    without a basis on its owner (an all-zero weight) is sent as NaN and dropped everywhere.
    """
    rank = get_rank()
    for target in projector.targets:
        name = target.name
        if name not in projector.bases or owners.get(name) != rank:
            weight = target.conv.weight
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) \
                else torch.float32
            shape = (min(target.matrix_shape), projector.plan.rank_of(name))
            if owners.get(name) == rank:  # the owner has none: announce "no basis"
                projector.bases[name] = torch.full(shape, float('nan'), dtype=dtype,
                                                   device=weight.device)
            elif name not in projector.bases or tuple(projector.bases[name].shape) != shape:
                projector.bases[name] = torch.empty(shape, dtype=dtype, device=weight.device)
    for src in range(get_world_size()):
        broadcast_coalesced([projector.bases[name] for name, owner in owners.items()
                             if owner == src], src)
    for name in [n for n, b in projector.bases.items() if not bool(torch.isfinite(b).all())]:
        del projector.bases[name]


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
    (``[LOCAL_RANK]``) are dropped, since torch DDP accepts them only for CUDA modules.

    Args:
        module: the model.
        detect_anomalous_params (bool): see ``MMDistributedDataParallel``.
        **kwargs: passed to ``torch.nn.parallel.DistributedDataParallel``.
    """

    def __init__(self, module, detect_anomalous_params: bool = False, **kwargs) -> None:
        on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
        if on_cpu and kwargs.get('device_ids') is not None:
            print_log(f'LRPETDDP: the model is on CPU; ignoring device_ids='
                      f'{kwargs["device_ids"]}', logger='current')
            kwargs['device_ids'] = None
            kwargs.pop('output_device', None)
        super().__init__(module=module, detect_anomalous_params=detect_anomalous_params,
                         **kwargs)

    def lrpet_assignment(self, projector: LowRankProjector) -> Dict[str, int]:
        """``{layer name: rank that projects it}`` for the current world size."""
        return assign_layers(projector.targets, get_world_size())

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
        owners = self.lrpet_assignment(projector)
        sync_projection_inputs(projector, src=0)

        error: Optional[BaseException] = None
        local = ProjectionStats(num_layers=0)
        try:
            local = projector.project(where=where,
                                      layer_filter=lambda t: owners[t.name] == rank)
        except Exception as e:  # report to the other ranks instead of leaving them waiting
            error = e
        report = dict(energy_kept=local.energy_kept, seconds=local.seconds,
                      methods=local.methods,
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
            if projector.warm_start:
                broadcast_bases(projector, owners)

        energy: Dict[str, float] = {}
        methods: Dict[str, str] = {}
        for rep in reports:
            energy.update(rep['energy_kept'])
            methods.update(rep['methods'])
        energy = {t.name: energy[t.name] for t in projector.targets if t.name in energy}
        return DistributedProjectionStats(
            num_layers=len(energy), energy_kept=energy, methods=methods,
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
    broadcast_weights(projector, src=0)
    return stats


ProjectionStrategy = Callable[[LowRankProjector, str], ProjectionStats]


def projection_strategy(model) -> ProjectionStrategy:
    """How ``model`` (the runner's, possibly wrapped) wants its projections distributed: its
    own ``lrpet_project(projector, where)`` (:class:`LRPETDDP`), else
    :func:`project_on_all_ranks`."""
    own = getattr(model, 'lrpet_project', None)
    return own if callable(own) else project_on_all_ranks


def init_cpu_process_group(backend: str = 'gloo', **kwargs) -> bool:
    """Initialize the default process group for CPU-only distributed training.

    mmengine 0.10's ``--launcher pytorch`` (``mmengine.dist.init_dist``) calls
    ``torch.cuda.set_device(LOCAL_RANK)`` before ``init_process_group``, which raises on a
    machine without a GPU; the Runner skips ``init_dist`` when a process group already exists.
    Call this from a module listed in the config's ``custom_imports`` (imported by
    ``Config.fromfile`` in ``tools/train.py``, before the Runner is built). It does nothing
    unless launched by ``torch.distributed.run`` (``WORLD_SIZE`` set), without CUDA, and not
    yet initialized.

    Args:
        backend: process group backend. Defaults to 'gloo'.
        **kwargs: passed to ``torch.distributed.init_process_group``.

    Returns:
        True if it initialized the process group.
    """
    if ('WORLD_SIZE' not in os.environ or torch.cuda.is_available()
            or not torch_dist.is_available() or torch_dist.is_initialized()):
        return False
    torch_dist.init_process_group(backend=backend, **kwargs)
    atexit.register(destroy_process_group_at_exit)
    return True


def destroy_process_group_at_exit() -> None:
    """Workaround: a gloo process group still alive when the interpreter shuts down can abort
    the process ("terminate called without an active exception", exit code -6) after training
    has finished — seen once in 4 CPU runs of tests/test_distributed.py with torch 2.5.1.
    mmengine does not destroy the group it did not create; :func:`init_cpu_process_group`
    registers this to do it at exit."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
