"""Benchmark the projection engine against per-layer full SVD (issue: target P1).

Projects every planned conv of a ResNet backbone (BN rectification and energy transfer on,
as LRPETHook does by default) with

* the baseline: per-layer full ``torch.linalg.svd`` (``LowRankProjector(method='svd')``:
  P̂ = U_k·(S_k·V_kᵀ) of the BN-folded weight, one product after the SVD), and
* the engine: ``LowRankProjector()`` (exact float64 Gram eigendecomposition the first time,
  certified warm-started subspace iteration afterwards),

on the same weights in the same run, for: random init (cold: the first projection) and
"trained-like" weights — the weights right after an LRPET projection plus a drift (dense
noise of a given size relative to each weight's norm, standing for the training between two
projections), with the engine warm-started from that previous projection.

Reports per scenario: median wall time of both (``--repeats``), speedup, how each layer was
solved, the worst ‖W' − P̂(W')‖_F / sqrt(Σ_{i>k} σ_i²) − 1 over layers (σ of the BN-folded
W' in float64; target <= 1e-4), the largest numerical rank excess over k, and the peak extra
memory of one projection pass — in MB, and without the warm-start bases the pass stores
(persistent projector state, ≈ 0.9× the largest layer for ResNet-50) relative to the largest
layer's weight (target <= 2): on CUDA from ``torch.cuda.max_memory_allocated``, on CPU from
the peak resident set (VmHWM, reset before the pass) of a child process that replays the
same scenarios with glibc's mmap threshold pinned (so freed tensors leave the resident set).
Timings are taken in this process with the default allocator (pinning the threshold makes
every large tensor a fresh mmap, which slows the many-small-allocations engine more than the SVD
baseline).
Warm scenarios are also timed with ``--layer-workers`` layers projected at once (both
methods, CPU threads split between them): how much cross-layer parallelism — what batching
same-shape layers would exploit — gains for each side.
Prints a Markdown table and writes JSON (and .md) atomically.

    python benchmarks/bench_projection.py                 # ResNet-50, the paper's setting
    python benchmarks/bench_projection.py --quick         # ResNet-18, small, ~10 s
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import torch

from benchlib.common import machine_info, write_results
from lrpet_mm.engine.planning import plan_ranks_for_flops
from lrpet_mm.lowrank import (
    LowRankProjector,
    bn_scale,
    conv_weight_as_matrix,
    numerical_rank,
    project_low_rank,
    select_targets,
)
from lrpet_mm.lowrank.subspace import (
    basis_coefficients,
    expand_coefficients,
    gram_matrix,
    smaller_side,
)

RESULTS = Path(__file__).resolve().parent / 'results'


def build_backbone(depth: int, seed: int) -> torch.nn.Module:
    from mmdet.models.backbones import ResNet
    torch.manual_seed(seed)
    model = ResNet(depth=depth, init_cfg=None)  # PyTorch's default (Kaiming-uniform) init
    with torch.no_grad():  # BN statistics of a trained network are not all 1
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.3, 1.5)
                module.running_var.uniform_(0.2, 2.0)
    model.eval()  # (mmdet ResNet.train returns None)
    return model


def conv_weights(projector: LowRankProjector) -> Dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in projector.weights().items()}


def load_weights(projector: LowRankProjector, weights: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in projector.weights().items():
            w.copy_(weights[name])


def add_drift(projector: LowRankProjector, relative: float, seed: int) -> None:
    """W += relative·‖W‖_F·N/‖N‖_F per layer (N dense Gaussian noise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in projector.weights().values():
            noise = torch.randn(w.shape, generator=g).to(w.device, w.dtype)
            w.add_(noise * (relative * w.norm() / noise.norm()))


def bases_bytes(projector: LowRankProjector) -> int:
    return sum(b.numel() * b.element_size() for b in projector.bases.values())


def _status_kib(key: str) -> int:
    return int(re.search(key + r':\s+(\d+)', Path('/proc/self/status').read_text()).group(1))


def peak_extra_bytes(run, device: torch.device) -> int:
    """Peak memory of ``run()`` above what was in use before it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        Path('/proc/self/clear_refs').write_text('5')  # reset VmHWM to the current RSS
    except OSError:
        return -1
    before = _status_kib('VmRSS')
    run()
    return (_status_kib('VmHWM') - before) * 1024


def timed(run, device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def accuracy(projector: LowRankProjector, weights: Dict[str, torch.Tensor],
             bases: Dict[str, torch.Tensor]) -> dict:
    """Worst relative excess of the projection error over the optimum, and rank excess.

    Recomputes each layer's projection exactly as the projector does (same warm basis, same
    BN-folded matrix, no energy transfer) and compares with float64 singular values."""
    worst, rank_excess = 0.0, 0
    for target in projector.targets:
        matrix = conv_weight_as_matrix(weights[target.name])
        scale = bn_scale(target.norm).to(matrix) if target.rectify else None
        rank = projector.plan.rank_of(target.name)
        result = project_low_rank(matrix, rank, False, warm_basis=bases.get(target.name),
                                  method=projector.method, row_scale=scale)
        folded = matrix.double() if scale is None else matrix.double() * scale.double()[:, None]
        s = torch.linalg.svdvals(folded.cpu())
        optimum = float(s[rank:].pow(2).sum().sqrt())
        error = float((folded - result.matrix.double()).norm())
        if optimum > 0:
            worst = max(worst, error / optimum - 1.0)
        rank_excess = max(rank_excess, numerical_rank(result.matrix, rtol=1e-5) - rank)
    return dict(worst_excess=worst, rank_excess=rank_excess)


#: Stages of one warm projection timed by :func:`stage_breakdown`, in engine order.
STAGES = ('gram', 'gram_times_basis', 'qr', 'coefficients', 'expansion')
#: The stages any engine that writes the dense projected weight from a Gram-based subspace
#: needs: the Gram matrix (ΓW)(ΓW)ᵀ, the coefficients B = Qᵀ(ΓW) and the expansion Q·B.
UNAVOIDABLE_STAGES = ('gram', 'coefficients', 'expansion')


def stage_breakdown(projector: LowRankProjector, weights: Dict[str, torch.Tensor],
                    bases: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, float]:
    """Seconds per stage of one warm projection pass, summed over layers: each layer's
    stages run one by one with the same functions as the engine (Gram of the BN-folded
    matrix in its dtype, G·Q for the start basis and for the refined one, the QR between
    them, the coefficients and the expansion), each timed on its own. Weights are untouched.
    """
    totals = dict.fromkeys(STAGES, 0.0)

    def stage(name: str, run):
        """Time ``run()`` into ``totals[name]``; returns its result."""
        result = []
        totals[name] += timed(lambda: result.append(run()), device)
        return result[0]

    for target in projector.targets:
        matrix = conv_weight_as_matrix(weights[target.name])
        scale = bn_scale(target.norm).to(matrix) if target.rectify else None
        side = smaller_side(tuple(matrix.shape))
        start = bases[target.name].to(matrix)
        gram = stage('gram', lambda: gram_matrix(matrix, side, matrix.dtype, scale))
        z = stage('gram_times_basis', lambda: gram @ start)
        q = stage('qr', lambda: torch.linalg.qr(z)[0])
        stage('gram_times_basis', lambda: gram @ q)
        b = stage('coefficients', lambda: basis_coefficients(matrix, q, side, scale)[0])
        stage('expansion', lambda: expand_coefficients(q, b, side))
    return totals


def project_across_layers(projector: LowRankProjector, workers: int) -> None:
    """One projection pass with ``workers`` layers in flight at once (Python threads, torch's
    CPU threads split between them, largest layers first).

    Bench-only: it measures what cross-layer parallelism — what batching same-shape layers
    would exploit — gains for the engine and for the SVD baseline alike. torch's thread count
    is restored afterwards."""
    threads = torch.get_num_threads()
    order = sorted(projector.targets, key=lambda t: -t.conv.weight.numel())
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(projector.project_layer, order))
    finally:
        torch.set_num_threads(threads)


def run_scenario(name: str, engine: LowRankProjector, baseline: LowRankProjector,
                 repeats: int, device: torch.device, largest_bytes: int,
                 memory_only: bool = False, layer_workers: int = 0) -> dict:
    """Time (or, with ``memory_only``, measure the peak memory of) both methods on the
    engine's current weights and bases; leaves weights and bases as after one engine pass.
    Warm scenarios (every layer has a basis) also get the engine's :func:`stage_breakdown`
    (median over ``repeats`` per stage) in ``stages_ms`` and, with ``layer_workers`` >= 2
    (CPU), both methods timed again with that many layers in flight
    (:func:`project_across_layers`)."""
    weights = conv_weights(engine)
    bases = dict(engine.bases)
    if memory_only:
        load_weights(engine, weights)
        engine.bases = dict(bases)
        bases_before = bases_bytes(engine)
        memory = peak_extra_bytes(engine.project, device)
        # The bases a pass stores are the projector's persistent warm-start state (they
        # replace the previous ones; the cold pass creates them), not transient memory.
        stored = bases_bytes(engine) - bases_before
        load_weights(baseline, weights)
        memory_svd = peak_extra_bytes(baseline.project, device)
        engine.bases = dict(bases)
        load_weights(engine, weights)
        engine.project()
        return dict(scenario=name, peak_extra_mb=memory / 2 ** 20 if memory >= 0 else None,
                    bases_stored_mb=stored / 2 ** 20,
                    peak_extra_ratio=(memory - stored) / largest_bytes if memory >= 0 else None,
                    peak_extra_svd_ratio=(memory_svd / largest_bytes if memory_svd >= 0
                                          else None))
    svd_times, engine_times, methods = [], [], Counter()
    for _ in range(repeats):
        load_weights(baseline, weights)
        svd_times.append(timed(baseline.project, device))
        load_weights(engine, weights)
        engine.bases = dict(bases)
        stats = None

        def project():
            nonlocal stats
            stats = engine.project()
        engine_times.append(timed(project, device))
        methods = Counter(stats.methods.values())
    stages = concurrent = None
    if all(t.name in bases for t in engine.targets):
        runs = [stage_breakdown(engine, weights, bases, device) for _ in range(repeats)]
        stages = {stage: 1e3 * statistics.median(r[stage] for r in runs) for stage in STAGES}
        if layer_workers >= 2 and device.type == 'cpu':
            svd_par, engine_par = [], []
            for _ in range(repeats):
                load_weights(baseline, weights)
                svd_par.append(timed(lambda: project_across_layers(baseline, layer_workers),
                                     device))
                load_weights(engine, weights)
                engine.bases = dict(bases)
                engine_par.append(timed(lambda: project_across_layers(engine, layer_workers),
                                        device))
            svd_par_ms = 1e3 * statistics.median(svd_par)
            engine_par_ms = 1e3 * statistics.median(engine_par)
            concurrent = dict(workers=layer_workers, svd_ms=svd_par_ms,
                              engine_ms=engine_par_ms, speedup=svd_par_ms / engine_par_ms,
                              methods=dict(Counter(engine.last_methods[t.name]
                                                   for t in engine.targets)))
    result_bases = dict(engine.bases)
    acc = accuracy(engine, weights, bases)
    engine.bases = result_bases
    load_weights(engine, weights)
    engine.bases = dict(bases)
    engine.project()  # leave the weights and bases as after this projection
    svd_ms, engine_ms = 1e3 * statistics.median(svd_times), 1e3 * statistics.median(engine_times)
    breakdown = {}
    if stages is not None:
        floor_ms = sum(stages[stage] for stage in UNAVOIDABLE_STAGES)
        breakdown = dict(stages_ms=stages, rest_ms=engine_ms - sum(stages.values()),
                         floor_ms=floor_ms, speedup_cap=svd_ms / floor_ms)
        if concurrent is not None:
            concurrent.update(engine_gain=engine_ms / concurrent['engine_ms'],
                              svd_gain=svd_ms / concurrent['svd_ms'],
                              speedup_vs_sequential_svd=svd_ms / concurrent['engine_ms'])
            breakdown['across_layers'] = concurrent
    return dict(scenario=name, layers=len(engine.targets), svd_ms=svd_ms, engine_ms=engine_ms,
                speedup=svd_ms / engine_ms, methods=dict(methods), **acc, **breakdown,
                svd_times_ms=[1e3 * t for t in svd_times],
                engine_times_ms=[1e3 * t for t in engine_times])


def measure_memory_in_child(argv: List[str]) -> List[dict]:
    """Replay the scenarios in a child process with glibc's mmap threshold pinned and return
    its memory rows (CPU); see the module docstring."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'memory.json')
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 17))
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, '--memory-only',
                        '--out', out], check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(Path(out).read_text())['rows']


def markdown(rows: List[dict], settings: dict) -> str:
    lines = ['| scenario | layers | full SVD ms | engine ms | speedup | solved as | '
             'worst ‖W−P̂‖/tail − 1 | rank excess | peak extra MB (of which bases stored) | '
             'transient peak (× largest layer) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        solved = ', '.join(f'{k} {v}' for k, v in sorted(r['methods'].items()))
        if r['peak_extra_ratio'] is None:
            total = mem = 'n/a'
        else:
            total = f"{r['peak_extra_mb']:.1f} ({r['bases_stored_mb']:.1f})"
            mem = f"{r['peak_extra_ratio']:.2f} (SVD {r['peak_extra_svd_ratio']:.2f})"
        lines.append(f"| {r['scenario']} | {r['layers']} | {r['svd_ms']:.1f} | "
                     f"{r['engine_ms']:.1f} | {r['speedup']:.1f}× | {solved} | "
                     f"{r['worst_excess']:.1e} | {r['rank_excess']} | {total} | {mem} |")
    s = settings
    lines.append('')
    lines.append(f"ResNet-{s['depth']} backbone, {s['layers']} planned convs at "
                 f"{100 * s['flops_reduction']:.0f} % backbone FLOPs reduction (input "
                 f"{tuple(s['input_shape'])}), BN rectification + energy transfer, median of "
                 f"{s['repeats']} runs, {s['machine']['device']} ({s['machine']['cpu']}, "
                 f"{s['machine']['threads']} threads), torch {s['machine']['torch']}. "
                 f"Largest layer weight: {s['largest_layer_mb']:.2f} MB. Transient peak = peak "
                 f"extra memory of the pass minus the warm-start bases it stores (the "
                 f"projector's persistent state: created by the cold pass, replaced in place "
                 f"by later ones); the SVD baseline stores none.")
    warm = [r for r in rows if 'stages_ms' in r]
    if warm:
        lines += ['', '**Where the warm engine\'s time goes** (ms, summed over layers, each '
                  'stage timed on its own, median of the runs):', '',
                  '| scenario | Gram (ΓW)(ΓW)ᵀ | G·Q (start and refined) | QR | coefficients '
                  'Qᵀ(ΓW) | expansion Q·B | rest (certificate, Ritz, BN, overhead) | engine | '
                  'full SVD / (Gram + coefficients + expansion) |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
        for r in warm:
            st = r['stages_ms']
            lines.append(f"| {r['scenario']} | " + ' | '.join(f'{st[k]:.1f}' for k in STAGES)
                         + f" | {r['rest_ms']:.1f} | {r['engine_ms']:.1f} | "
                         f"{r['speedup_cap']:.1f}× |")
        lines += ['', 'The last column bounds the speedup of any engine that forms the Gram '
                  'matrix and writes the dense projected weight, at this machine\'s speed for '
                  'those three products (the SVD baseline takes its coefficients S_k·V_kᵀ from '
                  'the SVD and forms only the expansion).']
    across = [r for r in warm if 'across_layers' in r]
    if across:
        workers = across[0]['across_layers']['workers']
        lines += ['', f'**Cross-layer parallelism** ({workers} layers in flight, the CPU '
                  f'threads split between them, largest layers first; median of the runs):', '',
                  '| scenario | full SVD ms (sequential → parallel) | engine ms (sequential → '
                  'parallel) | SVD gain | engine gain | speedup, both parallel | parallel '
                  'engine vs sequential SVD |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for r in across:
            a = r['across_layers']
            lines.append(f"| {r['scenario']} | {r['svd_ms']:.1f} → {a['svd_ms']:.1f} | "
                         f"{r['engine_ms']:.1f} → {a['engine_ms']:.1f} | {a['svd_gain']:.2f}× | "
                         f"{a['engine_gain']:.2f}× | {a['speedup']:.1f}× | "
                         f"{a['speedup_vs_sequential_svd']:.1f}× |")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--depth', type=int, default=50, choices=(18, 34, 50, 101))
    parser.add_argument('--flops-reduction', type=float, default=0.5)
    parser.add_argument('--input-shape', type=int, nargs=3, default=(3, 800, 1333))
    parser.add_argument('--drifts', type=float, nargs='+', default=(0.01, 0.03, 0.1))
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: all cores)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=str(RESULTS / 'projection.json'))
    parser.add_argument('--quick', action='store_true',
                        help='ResNet-18, 224x224 planning input, one drift, 1 repeat')
    parser.add_argument('--layer-workers', type=int, default=2,
                        help='warm scenarios on CPU are also timed with this many layers in '
                             'flight at once (both methods; 0 or 1: not measured)')
    parser.add_argument('--memory-only', action='store_true',
                        help='only measure peak memory (run by the benchmark itself in a child '
                             'process)')
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.input_shape, args.drifts, args.repeats = 18, (3, 224, 224), (0.03,), 1
    if not 0 < args.flops_reduction < 1:
        parser.error(f'--flops-reduction must be in (0, 1), got {args.flops_reduction}')
    if args.repeats < 1:
        parser.error(f'--repeats must be >= 1, got {args.repeats}')
    if args.layer_workers < 0:
        parser.error(f'--layer-workers must be >= 0, got {args.layer_workers}')
    torch.set_num_threads(args.threads or os.cpu_count())
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda given but CUDA is not available')

    model = build_backbone(args.depth, args.seed).to(device)
    selection = select_targets(model, '', bn_rectify=True)
    plan = plan_ranks_for_flops(model, '', selection, args.flops_reduction,
                                tuple(args.input_shape)).plan
    engine = LowRankProjector(selection.targets, plan)
    baseline = LowRankProjector(selection.targets, plan, warm_start=False, method='svd')
    largest = max(w.numel() * w.element_size() for w in engine.weights().values())
    initial = conv_weights(engine)
    baseline.project()  # warm up (allocator, BLAS threads), then back to the random init
    load_weights(engine, initial)

    settings = dict(depth=args.depth, layers=len(plan), flops_reduction=args.flops_reduction,
                    input_shape=list(args.input_shape), repeats=args.repeats,
                    drifts=list(args.drifts), seed=args.seed, machine=machine_info(device),
                    largest_layer_mb=largest / 2 ** 20, layer_workers=args.layer_workers)
    scenarios = [('random init (cold, first projection)', None)] + [
        (f'after a projection + {100 * drift:g} % drift (warm)', drift) for drift in args.drifts]
    rows = []
    for i, (name, drift) in enumerate(scenarios):
        if drift is not None:
            add_drift(engine, drift, args.seed + i)
        rows.append(run_scenario(name, engine, baseline, args.repeats, device, largest,
                                 memory_only=args.memory_only,
                                 layer_workers=args.layer_workers))
        if not args.memory_only:
            print(f"{name}: {rows[-1]['svd_ms']:.1f} ms full SVD, {rows[-1]['engine_ms']:.1f} ms "
                  f"engine ({rows[-1]['speedup']:.1f}x)", flush=True)
    if args.memory_only:
        write_results(args.out, dict(settings=settings, rows=rows), '')
        return 0
    child_argv = ['--depth', str(args.depth), '--flops-reduction', str(args.flops_reduction),
                  '--input-shape', *map(str, args.input_shape),
                  '--drifts', *map(str, args.drifts), '--repeats', '1',
                  '--device', args.device, '--seed', str(args.seed),
                  '--threads', str(args.threads or os.cpu_count())]
    for row, memory in zip(rows, measure_memory_in_child(child_argv)):
        assert memory['scenario'] == row['scenario']
        row.update(peak_extra_mb=memory['peak_extra_mb'],
                   bases_stored_mb=memory['bases_stored_mb'],
                   peak_extra_ratio=memory['peak_extra_ratio'],
                   peak_extra_svd_ratio=memory['peak_extra_svd_ratio'])
    warm_rows = rows[1:]
    targets = dict(
        P1_speedup_ge_10=all(r['speedup'] >= 10 for r in warm_rows),
        accuracy_within_1e4=all(r['worst_excess'] <= 1e-4 and r['rank_excess'] <= 0 for r in rows),
        memory_le_2x=all(r['peak_extra_ratio'] is not None and r['peak_extra_ratio'] <= 2
                         for r in rows))
    table = markdown(rows, settings)
    print()
    print(table)
    print('targets (trained-like rows for speed):', targets)
    write_results(args.out, dict(settings=settings, rows=rows, targets=targets), table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
