"""Report of an LRPET run: FLOPs, parameters and task metric of the projected model (the
training config + checkpoint) against the compact model (the factorized config + checkpoint).

:func:`generate_report` writes ``report.md``, ``report.json`` and ``ranks.png`` into an output
directory (``tools/report.py`` is its command line). FLOPs follow ``mmengine.analysis``
(one multiply-add = one FLOP) and are counted on an all-zero input of the shape the planner
uses (given, else read from the config).
"""
import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from mmengine.config import Config
from torch import nn

from ..engine.checkpoint_meta import rank_plan_from_checkpoint
from ..engine.flops import rpn_proposals
from ..engine.input_shape import resolve_input_shape
from ..lowrank import LowRankConv2d, LowRankLinear, bn_folded_matrix, find_conv_norm_pairs
from ..lowrank.batchnorm import has_running_stats, is_batch_norm
from ..utils.atomic import atomic_path, check_writable_dir
from ..utils.values import finite_or_none
from .complexity import FLOPS_CONVENTION, measure_complexity
from .evaluation import evaluate_checkpoint, primary_metric
from .markdown import build_rows, markdown_report

PathLike = Union[str, os.PathLike]

TASKS = {'mmdet': 'detection', 'mmseg': 'segmentation'}
NUM_SPECTRA = 4
REPORT_FILES = ('report.md', 'report.json', 'ranks.png')


def config_scope(cfg: Config, where: str = 'config') -> str:
    """The config's ``default_scope`` (``'mmdet'`` or ``'mmseg'``)."""
    scope = cfg.get('default_scope', None)
    if scope not in TASKS:
        raise ValueError(f'{where} has default_scope {scope!r}; the report supports '
                         f'{sorted(TASKS)} (detection and segmentation configs)')
    return scope


# --------------------------------------------------------------------------- layers, spectra
def _conv_geometry(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            tuple(conv.padding), tuple(conv.dilation))


def _matches_original(layer: Optional[nn.Module], pair: nn.Module) -> bool:
    """Whether ``layer`` of the original model has the geometry of the factorized ``pair``."""
    reduce, expand = pair[0], pair[1]
    if isinstance(pair, LowRankLinear):
        return isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (
            reduce.in_features, expand.out_features)
    return isinstance(layer, nn.Conv2d) and _conv_geometry(layer) == (
        reduce.in_channels, expand.out_channels, tuple(reduce.kernel_size),
        tuple(reduce.stride), tuple(reduce.padding), tuple(reduce.dilation))


def factorized_layers(original: nn.Module, compact: nn.Module, checkpoint: dict,
                      where: str) -> List[dict]:
    """Each factorized conv or linear layer of ``compact`` (model order) with its kept and full
    rank and its ``kind`` (``'conv'`` / ``'linear'``).

    Checks that the original model has a matching layer at every factorized name.
    """
    try:
        plan = rank_plan_from_checkpoint(checkpoint)
    except ValueError:
        plan = None
    pairs = find_conv_norm_pairs(original)
    layers = []
    for name, module in compact.named_modules():
        if not isinstance(module, (LowRankConv2d, LowRankLinear)):
            continue
        kind = 'linear' if isinstance(module, LowRankLinear) else 'conv'
        try:
            conv = original.get_submodule(name)
        except AttributeError:
            conv = None
        if not _matches_original(conv, module):
            raise ValueError(f'{where}: the compact model factorizes {name!r}, which has no '
                             f'{kind} of the same geometry in the original model (config / '
                             'low-rank config mismatch?)')
        m, n = conv.weight.shape[0], conv.weight[0].numel()
        norm_name = pairs.get(name) if kind == 'conv' else None
        folded = False
        if norm_name is not None:
            try:
                folded = isinstance(compact.get_submodule(norm_name), nn.Identity)
            except AttributeError:
                folded = False
        layers.append(dict(
            name=name, kind=kind, rank=int(module.rank), full_rank=min(m, n), out_features=m,
            in_features=n, planned_rank=(plan.rank_of(name) if plan is not None
                                         and name in plan else None),
            folded_norm=norm_name if folded else None))
    if not layers:
        raise ValueError(f'{where}: the low-rank model has no factorized convs or linear '
                         'layers; is it the output of tools/factorize.py (LRPETFactorized)?')
    return layers


@torch.no_grad()
def weight_spectrum(original: nn.Module, name: str, norm_name: Optional[str]) -> List[float]:
    """Singular values (descending) of layer ``name``'s weight as an (m, n) matrix, with the BN
    ``norm_name`` folded in (the matrix LRPET projects), in float64."""
    norm = original.get_submodule(norm_name) if norm_name is not None else None
    if norm is not None and not (is_batch_norm(norm) and has_running_stats(norm)):
        norm = None
    weight = original.get_submodule(name).weight.detach().double()
    return [float(v) for v in torch.linalg.svdvals(bn_folded_matrix(weight, norm))]


def spread_indices(count: int, num: int = NUM_SPECTRA) -> List[int]:
    """Up to ``num`` distinct indices spread evenly over range(count), first and last included."""
    if count <= num:
        return list(range(count))
    return sorted({round(i * (count - 1) / (num - 1)) for i in range(num)})


# --------------------------------------------------------------------------- the report
class _Cleanup:
    """Remove what a failed report created in the output directory (and nothing else)."""

    def __init__(self, out_dir: Path, created_dir: bool):
        self.out_dir = out_dir
        self.created_dir = created_dir
        self.before = set(os.listdir(out_dir))
        self.nested: Dict[Path, Optional[set]] = {}

    def watch(self, path: Path) -> None:
        """Also remove new entries inside ``path`` (a pre-existing subdirectory)."""
        self.nested[path] = set(os.listdir(path)) if path.is_dir() else None

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()

    def __call__(self) -> None:
        for path, before in self.nested.items():
            if before is not None and path.is_dir():
                for entry in set(os.listdir(path)) - before:
                    self._remove(path / entry)
        if self.out_dir.is_dir():
            for entry in set(os.listdir(self.out_dir)) - self.before:
                self._remove(self.out_dir / entry)
            if self.created_dir:
                with contextlib.suppress(OSError):
                    self.out_dir.rmdir()


def generate_report(config: PathLike, checkpoint: PathLike, out_dir: PathLike,
                    lowrank_config: Optional[PathLike] = None,
                    lowrank_checkpoint: Optional[PathLike] = None,
                    input_shape: Optional[Sequence[int]] = None, evaluate: bool = True,
                    progress: bool = True, verbose: bool = False,
                    cfg_options: Optional[dict] = None) -> dict:
    """Compare the projected model with its compact factorization and write the report.

    Args:
        config, checkpoint: the training config (with ``LRPETHook``) and its checkpoint.
        out_dir: where ``report.md``, ``report.json``, ``ranks.png`` (and, if produced here,
            the compact files and the test runs' work dirs ``eval/{original,compact}``) go.
        lowrank_config, lowrank_checkpoint: the compact model (``tools/factorize.py``'s
            output); if not given, ``factorize_checkpoint(config, checkpoint, out_dir)`` makes
            them.
        input_shape: (C, H, W) for FLOPs; default: from the config, the rule the hook's
            planner uses (:func:`~lrpet_mm.engine.input_shape.resolve_input_shape`).
        evaluate: run the test loop of both models for the task metric.
        progress: show a progress bar (stderr) while evaluating.
        verbose: let the test runners log to the console as usual.
        cfg_options: settings merged into both configs (``--cfg-options`` of the tools).

    Returns:
        The report as written to ``report.json``.

    Raises:
        FileNotFoundError, ValueError, PermissionError, KeyError: bad inputs (each naming the
            file); nothing is left in ``out_dir`` then.
    """
    if (lowrank_config is None) != (lowrank_checkpoint is None):
        raise ValueError('give both lowrank_config and lowrank_checkpoint, or neither')
    with warnings.catch_warnings():
        if not verbose:  # upstream deprecation noise while building models
            warnings.simplefilter('ignore')
        return _generate_report(config, checkpoint, out_dir, lowrank_config,
                                lowrank_checkpoint, input_shape, evaluate, progress, verbose,
                                cfg_options)


def _generate_report(config, checkpoint, out_dir, lowrank_config, lowrank_checkpoint,
                     input_shape, evaluate, progress, verbose, cfg_options) -> dict:
    from ..models.factorize_checkpoint import factorize_checkpoint
    from ..models.loading import load_config, load_model_and_checkpoint

    # Validate everything that can be checked before writing anything.
    cfg = load_config(config, cfg_options)
    scope = config_scope(cfg, f'config {os.fspath(config)!r}')
    shape = resolve_input_shape(cfg, input_shape)
    original, ckpt = load_model_and_checkpoint(cfg, checkpoint, config)

    def load_compact():
        lcfg = load_config(lowrank_config, cfg_options)
        _check_same_scope(scope, lcfg, lowrank_config)
        compact, lckpt = load_model_and_checkpoint(lcfg, lowrank_checkpoint, lowrank_config)
        where = (f'low-rank config {os.fspath(lowrank_config)!r} vs config '
                 f'{os.fspath(config)!r}')
        layers = factorized_layers(original, compact, ckpt, where)
        return lcfg, compact, lckpt, layers

    if lowrank_config is not None:
        lcfg, compact, lckpt, layers = load_compact()

    out_path = Path(out_dir)
    created_dir = not out_path.exists()
    out_path = check_writable_dir(out_path)
    cleanup = _Cleanup(out_path, created_dir)
    try:
        if lowrank_config is None:
            produced = factorize_checkpoint(config, checkpoint, out_path,
                                            cfg_options=cfg_options)
            lowrank_config, lowrank_checkpoint = produced.config_path, produced.checkpoint_path
            lcfg, compact, lckpt, layers = load_compact()
        report_warnings = _source_warnings(lckpt, original, compact, checkpoint,
                                           lowrank_checkpoint, layers)

        complexity = dict(original=measure_complexity(original, shape),
                          compact=measure_complexity(compact, shape))

        spectra = []
        for index in spread_indices(len(layers)):
            layer = layers[index]
            spectra.append(dict(name=layer['name'], rank=layer['rank'],
                                full_rank=layer['full_rank'],
                                folded=layer['folded_norm'] is not None,
                                singular_values=weight_spectrum(original, layer['name'],
                                                                layer['folded_norm'])))

        metric, metrics = None, None
        if evaluate:
            eval_dir = out_path / 'eval'
            cleanup.watch(eval_dir)
            metrics = {}
            for which, (c, k) in (('original', (cfg, checkpoint)),
                                  ('compact', (lcfg, lowrank_checkpoint))):
                work_dir = eval_dir / which
                cleanup.watch(work_dir)
                title = (f'evaluating the {"projected" if which == "original" else which} '
                         f'model: {os.fspath(k)}')
                metrics[which] = evaluate_checkpoint(c, k, work_dir, progress=progress,
                                                     title=title, verbose=verbose)
            name = primary_metric(metrics['original'])
            if name not in metrics['compact']:
                raise ValueError(f'the compact model\'s test evaluator did not return {name!r} '
                                 f'(got {sorted(metrics["compact"])})')
            metric = dict(name=name, original=metrics['original'][name],
                          compact=metrics['compact'][name],
                          delta=metrics['compact'][name] - metrics['original'][name])

        report = dict(
            task=TASKS[scope], default_scope=scope, input_shape=list(shape),
            flops_convention=FLOPS_CONVENTION, rpn_proposals=rpn_proposals(original),
            original=dict(config=_abs(config), checkpoint=_abs(checkpoint)),
            compact=dict(config=_abs(lowrank_config), checkpoint=_abs(lowrank_checkpoint)),
            metric=metric, metrics=metrics,
            rows=build_rows(complexity, metric), complexity=complexity,
            layers=layers, spectra=spectra, warnings=report_warnings,
            files={name: str(out_path / name) for name in REPORT_FILES})
        report = finite_or_none(report)

        from .plots import plot_ranks
        with atomic_path(out_path / 'report.json') as tmp_json, \
                atomic_path(out_path / 'report.md') as tmp_md, \
                atomic_path(out_path / 'ranks.png') as tmp_png:
            tmp_json.write_text(json.dumps(report, indent=2) + '\n')
            tmp_md.write_text(markdown_report(report))
            plot_ranks(layers, spectra, tmp_png,
                       title=f'{Path(os.fspath(config)).stem}: kept rank and singular values')
    except BaseException:
        cleanup()
        raise
    return report


def _abs(path: PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def _check_same_scope(scope: str, lcfg: Config, lowrank_config: PathLike) -> None:
    lscope = config_scope(lcfg, f'low-rank config {os.fspath(lowrank_config)!r}')
    if lscope != scope:
        raise ValueError(f'low-rank config {os.fspath(lowrank_config)!r} has default_scope '
                         f'{lscope!r} but the config has {scope!r} (mismatched configs?)')


def _source_warnings(lckpt: dict, original: nn.Module, compact: nn.Module,
                     checkpoint: PathLike, lowrank_checkpoint: PathLike,
                     layers: List[dict]) -> List[str]:
    """Signs that the compact checkpoint was not factorized from this checkpoint."""
    found = []
    source = ((lckpt.get('meta') or {}).get('lrpet_factorized') or {}).get('source_checkpoint')
    if source is not None and os.path.abspath(source) != _abs(checkpoint):
        found.append(f'the low-rank checkpoint {os.fspath(lowrank_checkpoint)!r} was '
                     f'factorized from {source!r}, not from {_abs(checkpoint)!r}')
    # parameters untouched by factorization should be equal (unless fine-tuned afterwards)
    touched = set()
    for layer in layers:
        touched.add(layer['name'] + '.')
        if layer['folded_norm']:
            touched.add(layer['folded_norm'] + '.')
    state, lstate = original.state_dict(), compact.state_dict()
    differing = [k for k in state if k in lstate and not any(k.startswith(t) for t in touched)
                 and not k.endswith('num_batches_tracked')
                 and (state[k].shape != lstate[k].shape or not torch.equal(state[k], lstate[k]))]
    if differing:
        found.append(f'{len(differing)} tensors that factorization does not change differ '
                     f'between the checkpoint and the low-rank checkpoint (e.g. '
                     f'{differing[0]!r}): the compact model was not factorized from this '
                     'checkpoint, or was fine-tuned afterwards')
    return found
