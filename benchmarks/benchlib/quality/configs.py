"""The evidence benchmark's protocol and the mmengine configs of its rows: the rows
(:data:`ROWS`), the tasks and run settings (:func:`default_settings`), and each row's training
config built from the toy configs (:func:`base_config` and the variants of the half and the LRA
rows)."""
from __future__ import annotations

import copy
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from benchlib.common import REPO_ROOT
from benchlib.pretrained_backbone import PretrainSettings

PathLike = Union[str, os.PathLike]
CONFIG_DIR = REPO_ROOT / 'configs' / 'lrpet' / '_toy_'


# =============================================================================== settings
@dataclass(frozen=True)
class RowSpec:
    """One method (row of the table)."""
    key: str
    label: str
    kind: str  # 'baseline' | 'hook' | 'lra_half' | 'lra_pretrained' | 'prune'
    description: str
    hook_kwargs: Tuple[Tuple[str, object], ...] = ()
    #: a hook row's FLOPs budget: 'task' (the task's backbone budget), 'lrpet_model' (the
    #: whole-model FLOPs of the backbone-only LRPET plan) or 'model_half' (-50 % whole model)
    budget: str = 'task'


ROWS: Tuple[RowSpec, ...] = (
    RowSpec('baseline', 'baseline (uncompressed)', 'baseline',
            'the full network fine-tuned for T iterations, evaluated as is'),
    RowSpec('lrpet', 'LRPET (defaults)', 'hook',
            'LRPETHook(flops_reduction=r) with its defaults (in-span BN recovery, uniform '
            'ranks, frozen layers skipped), T iterations, then factorized'),
    RowSpec('paper', 'LRPET paper-exact', 'hook',
            "LRPETHook(flops_reduction=r, bn_recovery='eq16'): the BN recovery of the paper's "
            'eq. 16 (uniform ranks, as the paper), T iterations, then factorized',
            (('bn_recovery', 'eq16'),)),
    RowSpec('lrpet_model_eq', 'LRPET whole model, same FLOPs', 'hook',
            "LRPETHook(flops_reduction=r', scope=''): backbone, neck and heads projected "
            '(predictors and the auxiliary head left alone) with r\' chosen so the whole '
            "model's test-time FLOPs equal those of the LRPET (defaults) row's compact model, "
            'T iterations, then factorized', (('scope', ''),), budget='lrpet_model'),
    RowSpec('lrpet_model_half', 'LRPET whole model, −50 %', 'hook',
            "LRPETHook(flops_reduction=0.5, scope=''): half of the whole model's test-time "
            'FLOPs, T iterations, then factorized', (('scope', ''),), budget='model_half'),
    RowSpec('lra_half', 'LRA, equal budget', 'lra_half',
            'the baseline\'s checkpoint at T/2, every planned conv replaced by its truncated '
            'SVD (two convs, BN kept), fine-tuned T/2 continuing the schedule, BN folded'),
    RowSpec('lra_pretrained', 'LRA from pretrained', 'lra_pretrained',
            'the pretrained backbone decomposed by truncated SVD before any fine-tuning, '
            'then trained T iterations, BN folded'),
    RowSpec('prune', 'channel pruning', 'prune',
            'the baseline\'s checkpoint at T/2, the inner channels of every residual block '
            'pruned by L2 magnitude (Torch-Pruning, one ratio, stage outputs kept) to the '
            'backbone FLOPs of the LRPET row, fine-tuned T/2 continuing the schedule'),
    RowSpec('prune_model_eq', 'channel pruning whole model, same FLOPs', 'prune',
            'the baseline\'s checkpoint at T/2, the residual blocks\' inner channels and the '
            'heads\' inner channels (RPN conv, shared FCs; PSP pyramid convs and bottleneck) '
            'pruned by L2 magnitude with one ratio to the whole-model FLOPs of the LRPET '
            '(defaults) row, FPN width and predictor outputs kept, fine-tuned T/2',
            budget='lrpet_model'),
    RowSpec('prune_model_half', 'channel pruning whole model, −50 %', 'prune',
            'as the row above, pruned to half of the whole model\'s test-time FLOPs',
            budget='model_half'),
)
ROW_KEYS: Tuple[str, ...] = tuple(row.key for row in ROWS)
ROWS_BY_KEY: Dict[str, RowSpec] = {row.key: row for row in ROWS}
#: The rows of the main run (issue #27); the others form the ablation run (``--ablation``).
MAIN_ROWS: Tuple[str, ...] = ('baseline', 'lrpet', 'lrpet_model_eq', 'lrpet_model_half',
                              'prune', 'prune_model_eq', 'prune_model_half', 'lra_half')
ABLATION_ROWS: Tuple[str, ...] = ('baseline', 'lrpet', 'paper', 'lra_pretrained')
#: Execution order: the rows that start from the baseline's T/2 checkpoint right after it.
RUN_ORDER: Tuple[str, ...] = ('baseline', 'lra_half', 'prune_model_eq', 'prune_model_half',
                              'prune', 'lrpet', 'paper', 'lrpet_model_eq', 'lrpet_model_half',
                              'lra_pretrained')
#: The paired comparisons reported, ``(ours, other)``: LRPET (defaults) against every other
#: row, and each whole-model LRPET row against channel pruning at its FLOPs.
COMPARISONS: Tuple[Tuple[str, str], ...] = tuple(
    ('lrpet', key) for key in ROW_KEYS if key != 'lrpet') + (
    ('lrpet_model_eq', 'prune_model_eq'), ('lrpet_model_half', 'prune_model_half'))
#: Rows whose compact model differs from the backbone-only plan outside the backbone (their
#: backbone FLOPs are not the backbone budget's).
WHOLE_MODEL_ROWS = ('lrpet_model_eq', 'lrpet_model_half', 'prune_model_eq', 'prune_model_half')
#: Rows that share the first T/2 iterations of the baseline.
HALF_ROWS = ('lra_half', 'prune', 'prune_model_eq', 'prune_model_half')


@dataclass(frozen=True)
class TaskSettings:
    """How one task is trained and measured."""
    key: str  # 'det' | 'seg'
    task: str  # 'detection' | 'segmentation'
    config: str  # toy config file stem in configs/lrpet/_toy_
    model_name: str
    metric: str  # evaluator key
    metric_label: str
    metric_scale: float  # to percent: 100 for a fraction (mAP), 1 for mIoU (already %)
    flops_reduction: float
    iters: int  # T
    batch_size: int = 2
    lr: float = 0.01
    projections: int = 8  # LRPET projections during T (and one at the end)

    @property
    def projection_interval(self) -> int:
        return max(1, self.iters // self.projections)

    def schedule_text(self) -> str:
        lr = (f'linear warm-up over {max(1, self.iters // 10)} iterations, ×0.1 at '
              f'{int(0.75 * self.iters)}' if self.key == 'det' else
              'poly decay (power 0.9, to 1e-4)')
        return (f'T = {self.iters} iterations of batch {self.batch_size}, SGD lr {self.lr} '
                f'({lr}); an LRPET projection every {self.projection_interval} iterations and '
                'at the end')


@dataclass(frozen=True)
class BenchSettings:
    """Everything that defines a benchmark run (stored in the results)."""
    mode: str  # 'full' | 'quick'
    num_train: int
    num_val: int
    img_size: Tuple[int, int]  # (w, h)
    classes: Tuple[str, ...]
    hard: bool
    data_seed: int
    seeds: Tuple[int, ...]
    tasks: Tuple[TaskSettings, ...]
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    deterministic: bool = True
    latency_repeats: int = 30  # timed runs of each deployed model per round
    latency_rounds: int = 5

    def to_dict(self) -> dict:
        data = asdict(self)
        data['img_size'] = list(self.img_size)
        data['classes'] = list(self.classes)
        data['seeds'] = list(self.seeds)
        data['tasks'] = {}
        for task in self.tasks:
            entry = asdict(task)
            entry['projection_interval'] = task.projection_interval
            entry['schedule'] = task.schedule_text()
            data['tasks'][task.key] = entry
        return data


#: Classes of the built-in data: the five shapes of the generator, one class each.
BENCH_CLASSES = ('person', 'car', 'dog', 'cat', 'aeroplane')


def _check_positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}')


#: The main run's protocol per task, ``(T, seeds)``, as the baseline-only pilot of 2026-12-03
#: decided it (``benchmarks/results/pilot/pilot_<task>.json``, rule of
#: ``benchlib.quality.pilot``; a test checks these against those files): fixed before any
#: compressed row of this protocol ran.
PROTOCOL: Dict[str, Tuple[int, int]] = {'det': (640, 4), 'seg': (640, 6)}
#: Test images of the main run and of the pilot (up from 100 before the pilot).
TEST_IMAGES = 400


def default_settings(quick: bool = False, seeds: Optional[int] = None,
                     tasks: Sequence[str] = ('det',), det_iters: Optional[int] = None,
                     seg_iters: Optional[int] = None) -> BenchSettings:
    """The full protocol or the ``quick`` smoke test (tiny data, budgets and pretraining).

    Full mode: 200 train / :data:`TEST_IMAGES` test images of 160×128, T and the number of
    seeds from :data:`PROTOCOL` (several tasks in one run: the most seeds of any; a run per
    task keeps each ≤ 90 min on 2 CPU cores). ``seeds`` (number of seeds, 0 .. N-1),
    ``det_iters`` / ``seg_iters`` (T, even) override the defaults.
    """
    for name, value in (('seeds', seeds), ('det_iters', det_iters), ('seg_iters', seg_iters)):
        _check_positive(name, value)
    for name, value in (('det_iters', det_iters), ('seg_iters', seg_iters)):
        if value is not None and value % 2:
            raise ValueError(f'{name} must be even (the half rows branch off at T/2), got '
                             f'{value}')
    if isinstance(tasks, str) or not tasks or any(t not in PROTOCOL for t in tasks):
        raise ValueError(f'tasks must be a non-empty subset of {sorted(PROTOCOL)}, got '
                         f'{tasks!r}')
    if quick:
        mode, num_train, num_val = 'quick', 8, 4
        num_seeds, iters = 2, dict(det=4, seg=4)
        pretrain = PretrainSettings.quick()
    else:
        mode, num_train, num_val = 'full', 200, TEST_IMAGES
        num_seeds = max(PROTOCOL[t][1] for t in tasks)
        iters = {t: PROTOCOL[t][0] for t in PROTOCOL}
        pretrain = PretrainSettings()
    det = TaskSettings('det', 'detection', 'faster-rcnn_r18_fpn_toy_voc',
                       'Faster R-CNN R-18 (deep stem) FPN', 'pascal_voc/mAP', 'mAP@0.5', 100.0,
                       flops_reduction=0.5, iters=det_iters or iters['det'])
    seg = TaskSettings('seg', 'segmentation', 'pspnet_r18-d8_toy_voc12aug',
                       'PSPNet R-18-D8 (ResNetV1c)', 'mIoU', 'mIoU', 1.0,
                       flops_reduction=0.3, iters=seg_iters or iters['seg'])
    by_key = {'det': det, 'seg': seg}
    return BenchSettings(mode=mode, num_train=num_train, num_val=num_val, img_size=(160, 128),
                         classes=BENCH_CLASSES, hard=True, data_seed=0,
                         seeds=tuple(range(seeds or num_seeds)),
                         tasks=tuple(by_key[t] for t in ('det', 'seg') if t in tasks),
                         pretrain=pretrain, latency_repeats=5 if quick else 30,
                         latency_rounds=2 if quick else 5)


# =============================================================================== configs
def _unformatted(cfg):
    """``cfg`` with yapf formatting of its text off (mmengine formats the whole config each
    time a Runner logs or dumps it, ~1.5 s per call; the flag survives deep copies)."""
    object.__setattr__(cfg, '_format_python_code', False)
    return cfg


def load_config(path: Path):
    from mmengine.config import Config

    return _unformatted(Config.fromfile(str(path)))


def _has_seg_aug(data_root: Path) -> bool:
    return (data_root / 'VOC2012' / 'ImageSets' / 'Segmentation' / 'aug.txt').is_file()


def schedulers(task: TaskSettings, second_half: bool = False) -> Tuple[List[dict], float]:
    """The LR schedule of ``T`` iterations, or of its second half (iterations T/2 .. T) as a
    schedule of its own: ``(param_scheduler, base lr)``."""
    n = task.iters
    if task.key == 'det':
        step = int(0.75 * n)
        if not second_half:
            return [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                         end=max(1, n // 10)),
                    dict(type='MultiStepLR', by_epoch=False, begin=0, end=n,
                         milestones=[step], gamma=0.1)], task.lr
        return [dict(type='MultiStepLR', by_epoch=False, begin=0, end=n // 2,
                     milestones=[max(1, step - n // 2)], gamma=0.1)], task.lr
    eta_min, power = 1e-4, 0.9
    if not second_half:
        return [dict(type='PolyLR', eta_min=eta_min, power=power, begin=0, end=n,
                     by_epoch=False)], task.lr
    # mmengine's PolyLR over ``end`` iterations scales (lr − η) by (1 − t/(end − 1))^p, so at
    # t = T/2 + s: (1 − (T/2 + s)/(T − 1))^p = ((T/2 − 1)/(T − 1))^p · (1 − s/(T/2 − 1))^p
    lr = eta_min + (task.lr - eta_min) * ((n // 2 - 1) / (n - 1)) ** power
    return [dict(type='PolyLR', eta_min=eta_min, power=power, begin=0, end=n // 2,
                 by_epoch=False)], lr


def base_config(task: TaskSettings, settings: BenchSettings, data_root: Path, work_dir: Path,
                seed: int, pretrained: Optional[Path], iters: Optional[int] = None):
    """The toy config of ``task`` set up for the benchmark: ResNet-18 deep stem from the
    pretrained checkpoint, ``T`` iterations without validation, a checkpoint at T/2 and T,
    seeded data order."""
    from mmengine.config import Config

    from benchlib.config_data_root import set_data_root

    path = CONFIG_DIR / f'{task.config}.py'
    if not path.is_file():
        raise FileNotFoundError(f'toy config {path} not found (the benchmark runs from a '
                                'checkout of the repository)')
    cfg = _unformatted(Config.fromfile(str(path)))
    set_data_root(cfg, str(data_root))
    n = task.iters if iters is None else iters
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'bench-{task.key}-{uuid.uuid4().hex[:8]}'
    if cfg.get('visualizer') is not None:
        cfg.visualizer.pop('name', None)
    cfg.custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
    cfg.custom_hooks = []
    cfg.randomness = dict(seed=int(seed), deterministic=settings.deterministic)
    cfg.val_dataloader = None
    cfg.val_cfg = None
    cfg.val_evaluator = None
    cfg.load_from = None
    cfg.resume = False
    backbone = cfg.model.backbone
    backbone.init_cfg = (None if pretrained is None else
                         dict(type='Pretrained', checkpoint=str(pretrained)))
    loader = cfg.train_dataloader
    loader.batch_size = task.batch_size
    loader.sampler = dict(type='InfiniteSampler', shuffle=True, seed=int(seed))
    if task.key == 'det':
        # Upstream VOC Faster R-CNN backbone settings, except: deep stem (the pretrained
        # checkpoint's stem); no frozen stage (with the deep stem, stem + layer1 hold 40 % of
        # the backbone FLOPs: −50 % is out of reach of a method that skips them); BN
        # statistics trained (norm_eval=False): the synthetic pretraining's statistics do not
        # fit the task images (a one-seed pilot with upstream's norm_eval=True: baseline
        # 0.75 % mAP after T = 160, 27.3 % with norm_eval=False; decided before any
        # compressed row ran).
        backbone.update(deep_stem=True, avg_down=False, frozen_stages=-1, norm_eval=False)
        model = cfg.model
        # Smaller heads than the toy config: on CPU they otherwise take most of the step time.
        model.neck.out_channels = 128
        model.rpn_head.in_channels = 128
        model.rpn_head.feat_channels = 128
        model.roi_head.bbox_roi_extractor.out_channels = 128
        model.roi_head.bbox_head.in_channels = 128
        model.roi_head.bbox_head.fc_out_channels = 256
        model.train_cfg.rcnn.sampler.num = 64
    else:
        cfg.model.pretrained = None
        if not _has_seg_aug(data_root):  # a real VOC2012 without SBD's SegmentationClassAug
            loader.dataset.datasets = loader.dataset.datasets[:1]
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=n, val_interval=n + 1)
    cfg.param_scheduler, cfg.optim_wrapper.optimizer.lr = schedulers(task)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10, log_metric_by_epoch=False)
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=max(1, n // 2), by_epoch=False, save_optimizer=False,
        save_param_scheduler=False, save_last=True)
    return cfg


def second_half_config(cfg, task: TaskSettings):
    """``cfg`` for the last T/2 iterations of the schedule (the half rows' fine-tuning)."""
    cfg = copy.deepcopy(cfg)
    n = task.iters // 2
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=n, val_interval=n + 1)
    cfg.param_scheduler, cfg.optim_wrapper.optimizer.lr = schedulers(task, second_half=True)
    cfg.default_hooks.checkpoint.interval = n
    return cfg


def factorized_train_config(cfg, components: Mapping[str, dict]):
    """``cfg`` whose components are factorized with the given ranks and their BNs kept (the
    LRA rows' network while it trains; weights come from ``load_from``)."""
    new = copy.deepcopy(cfg)
    for component, spec in components.items():
        inner = new.model[component]
        inner.init_cfg = None
        new.model[component] = dict(type='LRPETFactorized', module=inner,
                                    ranks=dict(spec['ranks']), folded_norms={})
    return new
