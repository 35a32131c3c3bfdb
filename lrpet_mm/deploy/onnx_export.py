"""Export the backbone of a (compact or original) mmdet / mmseg model to ONNX and check it with
onnxruntime (latency studies of the factorized backbone).

What is exported is ``model.backbone`` as a module of one tensor, the *preprocessed* image
batch (1, C, H, W) (mean/std normalized, as ``model._forward`` receives it), whose outputs are
the backbone's feature maps. Whole detectors / segmentors, post-processing included, are
deployed with ``tools/deploy.py`` (:mod:`lrpet_mm.deploy.mmdeploy_export`, mmdeploy).

The graph is traced at one fixed input shape (no dynamic axes).

**Check.** onnxruntime (CPUExecutionProvider) runs the file on a seeded standard-normal input
and every output is compared with PyTorch's output *of the model as given* (before the
latency-aware merge) by the max-normalized error ``max|onnx − torch| / max|torch|`` (absolute
``max|onnx − torch|`` where the PyTorch output is all zero). Every output must be within
``tol`` (default 1e-4); otherwise :class:`OnnxMismatchError` is raised and no file is written.
"""
import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..engine.input_shape import check_input_shape
from ..utils.atomic import atomic_path, check_writable_dir
from .export_modules import (
    export_wrapper,
    flatten_outputs,
    model_device,
    model_dtype,
    output_names,
)

PathLike = Union[str, os.PathLike]

DEFAULT_OPSET = 17
DEFAULT_TOL = 1e-4
ERROR_METRIC = ('max-normalized error max|onnx - torch| / max|torch| per output '
                '(absolute max|onnx - torch| for an all-zero output)')


class OnnxMismatchError(ValueError):
    """onnxruntime does not reproduce the PyTorch outputs within the tolerance."""


def check_onnx_path(out: PathLike) -> Path:
    """``out`` as a Path; a ValueError unless it ends in ``.onnx``."""
    out = Path(os.fspath(out))
    if out.suffix != '.onnx':
        raise ValueError(f'output file {str(out)!r} must end in .onnx')
    return out


# --------------------------------------------------------------------------- check
@dataclass
class OnnxCheck:
    """onnxruntime vs PyTorch: ``errors[name]`` is the max-normalized error of that output."""
    errors: Dict[str, float]
    tol: float
    metric: str = ERROR_METRIC

    @property
    def max_error(self) -> float:
        return max(self.errors.values()) if self.errors else 0.0

    @property
    def passed(self) -> bool:
        return all(math.isfinite(e) and e <= self.tol for e in self.errors.values())

    def summary(self) -> str:
        worst = max(self.errors, key=self.errors.get)
        return (f'onnxruntime check {"passed" if self.passed else "FAILED"}: max relative error '
                f'{self.max_error:.2e} (output {worst!r}; tolerance {self.tol:g}; '
                f'{len(self.errors)} outputs)')


def max_normalized_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max|actual − expected| / max|expected| (absolute max|actual − expected| if expected is
    all zero); inf for a shape mismatch or a non-finite value."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape or not np.isfinite(actual).all():
        return float('inf')
    if expected.size == 0:
        return 0.0
    diff = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max())
    return diff / scale if scale > 0 else diff


def check_onnx_outputs(path: PathLike, reference: Sequence[Tensor], inputs: Tensor,
                       names: Sequence[str], tol: float = DEFAULT_TOL,
                       threads: Optional[int] = None) -> OnnxCheck:
    """Run ``path`` in onnxruntime on ``inputs`` and compare with ``reference`` outputs."""
    from .timing import ort_session

    session = ort_session(path, threads)
    feed = {session.get_inputs()[0].name: inputs.detach().float().cpu().numpy()}
    got = session.run(None, feed)
    if len(got) != len(reference):
        raise OnnxMismatchError(f'the ONNX model has {len(got)} outputs, PyTorch gives '
                                f'{len(reference)}')
    errors = {name: max_normalized_error(g, r.detach().float().cpu().numpy())
              for name, g, r in zip(names, got, reference)}
    return OnnxCheck(errors, tol)


# --------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        size_bytes: its size.
        input_shape: the (C, H, W) the backbone was exported at.
        output_names: the graph's outputs, in order.
        check: the onnxruntime comparison (None with ``check=False``).
        merge: the latency-aware merge's record (None if not applied).
        low_rank_layers: low-rank (factorized) layers left in the exported graph.
    """
    path: Path
    size_bytes: int
    input_shape: Tuple[int, int, int]
    output_names: List[str]
    check: Optional[OnnxCheck] = None
    merge: Optional[object] = None
    low_rank_layers: int = 0

    def to_dict(self) -> dict:
        return dict(path=str(self.path), size_bytes=self.size_bytes,
                    input_shape=list(self.input_shape), output_names=list(self.output_names),
                    check=None if self.check is None else dict(asdict(self.check),
                                                               passed=self.check.passed),
                    merge=None if self.merge is None else self.merge.to_dict(),
                    low_rank_layers=self.low_rank_layers)


def format_size(size_bytes: int) -> str:
    return f'{size_bytes / 2**20:.2f} MiB ({size_bytes} bytes)'


def export_onnx(model: nn.Module, input_shape: Sequence[int], out: PathLike,
                opset: int = DEFAULT_OPSET, check: bool = True, tol: float = DEFAULT_TOL,
                latency_aware: bool = False, merge_runtime: str = 'onnxruntime',
                merge_repeats: int = 10, merge_warmup: int = 2, merge_margin: float = 0.05,
                threads: Optional[int] = None, seed: int = 0) -> ExportResult:
    """Export the backbone of ``model`` (a float32 CPU copy in eval mode; ``model`` itself is
    not modified) to ``out``.

    Args:
        model: an mmdet / mmseg model (original or compact).
        input_shape: (C, H, W); the graph is fixed to batch 1 at this size.
        out: the ``.onnx`` file; its directory is created; written to a temporary file and
            renamed only after the check passed.
        opset: ONNX opset. Defaults to 17.
        check: compare onnxruntime with PyTorch (see the module docstring).
        tol: largest accepted max-normalized error per output. Defaults to 1e-4.
        latency_aware: first apply :func:`~lrpet_mm.deploy.latency.latency_aware_merge` at
            this input size (timed in ``merge_runtime`` with ``merge_repeats``,
            ``merge_warmup``, ``merge_margin``, ``threads``). Off by default here; the CLI
            ``tools/export_onnx.py`` turns it on.
        threads: threads for onnxruntime / timing (None: all cores).
        seed: seed of the check input.

    Raises:
        ValueError: bad shape / tolerance, or a model without a backbone.
        OnnxMismatchError: the check failed (nothing written).
    """
    shape = check_input_shape(input_shape)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 11 <= opset <= 20:
        raise ValueError(f'opset must be an integer in [11, 20], got {opset!r}')
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f'tol must be a positive number, got {tol!r}')
    out = check_onnx_path(out)
    check_writable_dir(out.parent, 'output directory')

    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed)).to(
        model_dtype(model)).to(model_device(model))
    was_training = model.training
    try:
        reference_wrapper = export_wrapper(model, shape)  # sets eval mode
        with torch.no_grad():
            reference = flatten_outputs(reference_wrapper(x))
    finally:
        model.train(was_training)
    names = output_names(reference_wrapper, len(reference))

    deployed = copy.deepcopy(model).float().cpu()
    deployed.eval()
    merge = None
    if latency_aware:
        from .latency import latency_aware_merge
        example_wrapper = export_wrapper(deployed, shape)
        merge = latency_aware_merge(deployed, lambda _m: example_wrapper(torch.zeros(1, *shape)),
                                    runtime=merge_runtime, repeats=merge_repeats,
                                    warmup=merge_warmup, margin=merge_margin, threads=threads,
                                    inplace=True)
    wrapper = export_wrapper(deployed, shape)
    x_cpu = x.float().cpu()
    from .latency import low_rank_layers
    n_low_rank = len(low_rank_layers(deployed))

    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about Python control flow
            torch.onnx.export(wrapper, (x_cpu, ), str(tmp), opset_version=opset,
                              input_names=['input'], output_names=names,
                              do_constant_folding=True)
        import onnx
        onnx.checker.check_model(str(tmp))
        result = ExportResult(out, tmp.stat().st_size, shape, names, merge=merge,
                              low_rank_layers=n_low_rank)
        if check:
            result.check = check_onnx_outputs(tmp, reference, x_cpu, names, tol, threads)
            if not result.check.passed:
                bad = {k: f'{v:.2e}' for k, v in result.check.errors.items() if not v <= tol}
                raise OnnxMismatchError(
                    f'onnxruntime does not reproduce PyTorch for the backbone: outputs {bad} '
                    f'exceed the tolerance {tol:g} ({ERROR_METRIC}); {str(out)!r} not written')
    return result


# --------------------------------------------------------------------------- loading
def load_model(config: PathLike, checkpoint: PathLike,
               cfg_options: Optional[dict] = None) -> Tuple[nn.Module, object]:
    """Build the config's model (no pretrained download, ``cfg_options`` merged into the
    config) and load ``checkpoint`` with every key matched; returns (model on CPU in eval mode,
    config)."""
    from ..models.loading import load_config, load_model_and_checkpoint

    cfg = load_config(config, cfg_options)
    model, _ = load_model_and_checkpoint(cfg, checkpoint, config)
    model.cpu()
    model.eval()
    return model, cfg
