"""Budgeted rank allocation by energy (lrpet_mm.lowrank.ranks.allocate_ranks_by_energy)."""
import itertools
import math
import time

import pytest
import torch

from lrpet_mm.lowrank import (
    LayerSpectrum,
    RankPlan,
    allocate_ranks_by_energy,
    allowed_ranks,
    estimated_flops_removed,
    factorization_pays,
    normalized_energy_kept,
    plan_ranks,
    rank_for_ratio,
    rank_plan_from_ranks,
)


def spectrum(m, n, sigma, flops=None, extra=0.0):
    """A LayerSpectrum with singular values ``sigma`` (length min(m, n)); FLOPs default to a
    conv with m·n MACs per pixel on a 10×10 output."""
    energy = torch.as_tensor(sigma, dtype=torch.float64) ** 2
    return LayerSpectrum(m, n, float(m * n * 100 if flops is None else flops), energy, extra)


def decaying(length, rate):
    return [rate ** i for i in range(length)]


def power_law(length, exponent):
    return [(i + 1) ** -exponent for i in range(length)]


def resnet50_like():
    """53 layers with ResNet-50 backbone shapes (stem, 16 bottlenecks, 4 downsamples) and
    assorted spectra; FLOPs as at a 224×224 input."""
    gen = torch.Generator().manual_seed(0)
    layers = {'stem': (64, 3 * 49, 112 * 112)}
    inplanes, size = 64, 56
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], 1):
        for b in range(blocks):
            out_size = size // 2 if (b == 0 and stage > 1) else size
            cin = inplanes if b == 0 else planes * 4
            layers[f'layer{stage}.{b}.conv1'] = (planes, cin, size * size)
            layers[f'layer{stage}.{b}.conv2'] = (planes, planes * 9, out_size * out_size)
            layers[f'layer{stage}.{b}.conv3'] = (planes * 4, planes, out_size * out_size)
            if b == 0:
                layers[f'layer{stage}.{b}.downsample.0'] = (planes * 4, inplanes,
                                                            out_size * out_size)
            size = out_size
        inplanes = planes * 4
    specs = {}
    for i, (name, (m, n, pixels)) in enumerate(layers.items()):
        full = min(m, n)
        exponent = 0.2 + 1.5 * float(torch.rand((), generator=gen))
        sigma = power_law(full, exponent)
        specs[name] = spectrum(m, n, sigma, flops=m * n * pixels, extra=2 * m * pixels)
    assert len(specs) == 53
    return specs


def uniform_reference(layers, flops_to_remove, min_rank=1, rank_multiple=1):
    """The paper's way: one ratio for all layers, the smallest that removes the budget
    (bisection on plan_ranks under the same FLOPs model). Returns {name: rank}."""
    shapes = {name: (s.out_features, s.in_features) for name, s in layers.items()}

    def ranks_at(ratio):
        plan = plan_ranks(shapes, ratio, min_rank=min_rank, rank_multiple=rank_multiple)
        return {name: layer.rank for name, layer in plan.layers.items()}

    lo, hi = 0.0, 0.999
    assert estimated_flops_removed(layers, ranks_at(hi)) >= flops_to_remove
    for _ in range(60):
        mid = (lo + hi) / 2
        if estimated_flops_removed(layers, ranks_at(mid)) >= flops_to_remove:
            hi = mid
        else:
            lo = mid
    return ranks_at(hi)


def max_removable(layers, min_rank=1, rank_multiple=1):
    total = 0.0
    for s in layers.values():
        m, n = s.out_features, s.in_features
        k = allowed_ranks(m, n, min_rank, rank_multiple)[0]
        if factorization_pays(m, n, k):
            total += s.conv_flops * (1 - k * (m + n) / (m * n)) + s.extra_saved_flops
    return total


def undo_costs(layers, ranks, min_rank=1, rank_multiple=1):
    """FLOPs each possible single undo move gives back: one allowed rank step up, or
    unfactorizing a layer at its largest factorizing rank."""
    costs = []
    for name, k in ranks.items():
        s = layers[name]
        m, n = s.out_features, s.in_features
        larger = [r for r in allowed_ranks(m, n, min_rank, rank_multiple)
                  if r > k and factorization_pays(m, n, r)]
        up = {name: larger[0]} if larger else {}
        costs.append(s.flops_saved(k) - estimated_flops_removed(layers, up))
    return costs


def check_allocation(layers, ranks, target, min_rank=1, rank_multiple=1):
    removed = estimated_flops_removed(layers, ranks)
    assert removed >= target
    for name, k in ranks.items():
        s = layers[name]
        m, n = s.out_features, s.in_features
        assert factorization_pays(m, n, k), (name, k)
        assert k in allowed_ranks(m, n, min_rank, rank_multiple), (name, k)
        assert min_rank <= k < min(m, n)
        if rank_multiple > 1:
            assert k % rank_multiple == 0 or k == max(min_rank, rank_multiple), (name, k)
    # Not grossly over: no single undo move fits in the surplus.
    surplus = removed - target
    assert all(cost > surplus for cost in undo_costs(layers, ranks, min_rank, rank_multiple))
    return removed


@pytest.mark.parametrize('rank_multiple', [1, 8])
@pytest.mark.parametrize('fraction', [0.05, 0.3, 0.6, 0.9])
def test_budget_met_and_not_overshot(fraction, rank_multiple):
    layers = resnet50_like()
    target = fraction * max_removable(layers, 1, rank_multiple)
    ranks = allocate_ranks_by_energy(layers, target, rank_multiple=rank_multiple)
    check_allocation(layers, ranks, target, rank_multiple=rank_multiple)
    assert list(ranks) == [name for name in layers if name in ranks]  # module order


def test_surplus_below_smallest_layer_step():
    # Three layers all factorized past their entry rank: the surplus is under one rank step of
    # the layer with the smallest step.
    layers = {'a': spectrum(64, 576, power_law(64, 1.0)),
              'b': spectrum(128, 1152, power_law(128, 0.5)),
              'c': spectrum(256, 256, decaying(256, 0.97))}
    steps = {name: s.conv_flops * (s.out_features + s.in_features)
             / (s.out_features * s.in_features) for name, s in layers.items()}
    for fraction in (0.5, 0.61, 0.77, 0.93):
        target = fraction * max_removable(layers)
        ranks = allocate_ranks_by_energy(layers, target)
        assert set(ranks) == set(layers)
        removed = check_allocation(layers, ranks, target)
        assert removed - target < min(steps.values())


@pytest.mark.parametrize('min_rank,rank_multiple', [(1, 8), (12, 8), (20, 1), (5, 16)])
def test_min_rank_and_rank_multiple_respected(min_rank, rank_multiple):
    layers = resnet50_like()
    target = 0.95 * max_removable(layers, min_rank, rank_multiple)
    ranks = allocate_ranks_by_energy(layers, target, min_rank=min_rank,
                                     rank_multiple=rank_multiple)
    check_allocation(layers, ranks, target, min_rank, rank_multiple)
    smallest = allowed_ranks(64, 576, min_rank, rank_multiple)[0]
    assert smallest == max(min_rank, rank_multiple)
    assert min(ranks.values()) == smallest  # 95 % of the maximum needs the smallest ranks
    # The plan's ratios (1 − k/min(m, n)) give back the same ranks through rank_for_ratio,
    # except k = min_rank off the multiple grid (rank_for_ratio rounds to the grid first).
    plan = rank_plan_from_ranks(layers, ranks, min_rank, rank_multiple)
    assert {name: layer.rank for name, layer in plan.layers.items()} == ranks
    for name, layer in plan.layers.items():
        assert layer.ratio == pytest.approx(1 - ranks[name] / layer.full_rank)
        if ranks[name] % rank_multiple == 0:
            assert rank_for_ratio(layer.out_features, layer.in_features, layer.ratio,
                                  min_rank, rank_multiple) == ranks[name]


def test_allowed_ranks_match_rank_for_ratio():
    for m, n, min_rank, q in [(64, 576, 1, 1), (30, 147, 1, 8), (64, 147, 10, 8), (7, 7, 3, 4),
                              (256, 2304, 1, 16), (8, 20, 9, 1)]:
        reachable = {rank_for_ratio(m, n, p / 1000, min_rank, q) for p in range(1000)}
        assert set(allowed_ranks(m, n, min_rank, q)) == reachable, (m, n, min_rank, q)


def test_more_energy_than_uniform_ratio_at_equal_or_lower_flops():
    # One fast-decaying spectrum, one flat, one in between, of similar FLOPs.
    layers = {'fast': spectrum(256, 2304, decaying(256, 0.9)),
              'flat': spectrum(256, 2304, [1.0] * 256),
              'medium': spectrum(512, 1024, power_law(512, 0.7))}
    for fraction in (0.2, 0.4, 0.6):
        uniform = uniform_reference(layers, fraction * max_removable(layers))
        uniform_removed = estimated_flops_removed(layers, uniform)
        ranks = allocate_ranks_by_energy(layers, uniform_removed)
        removed = check_allocation(layers, ranks, uniform_removed)
        assert removed >= uniform_removed  # FLOPs after: equal or lower
        kept, kept_uniform = (normalized_energy_kept(layers, r) for r in (ranks, uniform))
        assert kept > kept_uniform + 0.05, (fraction, kept, kept_uniform)
        # The fast-decaying layer is cut harder than the flat one.
        assert ranks['fast'] < uniform['fast'] and ranks.get('flat', 256) > uniform['flat']


def test_beats_uniform_on_resnet50_like_with_rank_multiple():
    layers = resnet50_like()
    uniform = uniform_reference(layers, 0.5 * max_removable(layers, 1, 8), rank_multiple=8)
    uniform_removed = estimated_flops_removed(layers, uniform)
    ranks = allocate_ranks_by_energy(layers, uniform_removed, rank_multiple=8)
    check_allocation(layers, ranks, uniform_removed, rank_multiple=8)
    assert normalized_energy_kept(layers, ranks) > normalized_energy_kept(layers, uniform) + 0.5


def brute_force(layers, target):
    options = []
    for s in layers.values():
        m, n = s.out_features, s.in_features
        options.append([None] + [k for k in range(1, min(m, n) + 1) if factorization_pays(m, n, k)])
    best = None
    for choice in itertools.product(*options):
        ranks = {name: k for name, k in zip(layers, choice) if k is not None}
        if estimated_flops_removed(layers, ranks) >= target:
            kept = normalized_energy_kept(layers, ranks)
            if best is None or kept > best:
                best = kept
    return best


def test_flat_layer_entry_is_not_priced_alone():
    # A flat square layer's entry move (rank 7 of 16) loses 9/16 of its energy for a one-step
    # FLOPs jump; after that its steps are cheap. Pricing "enter at rank 7" alone (then single
    # steps) keeps 1.20, 1.13, 1.01, 0.88 here; the convex-hull moves find the optimum.
    layers = {'decaying': spectrum(16, 16, decaying(16, 0.7), flops=16 * 16 * 100),
              'flat': spectrum(16, 16, [1.0] * 16, flops=16 * 16 * 400)}
    for fraction in (0.2, 0.4, 0.6, 0.8):
        target = fraction * max_removable(layers)
        ranks = allocate_ranks_by_energy(layers, target)
        check_allocation(layers, ranks, target)
        assert normalized_energy_kept(layers, ranks) == pytest.approx(brute_force(layers, target))
        if fraction >= 0.4:
            assert 'flat' in ranks


def lagrangian_bound(layers, target):
    """An upper bound on the best total energy any allocation can keep (weak duality):
    for every λ >= 0, Σ_i max_k (E_i(k) + λ·saved_i(k)) − λ·target, k over unfactorized and
    all factorizing ranks; minimized over a grid of λ."""
    options = []
    for s in layers.values():
        m, n = s.out_features, s.in_features
        ks = [k for k in range(1, min(m, n) + 1) if factorization_pays(m, n, k)]
        kept = torch.tensor([1.0] + [s.energy_kept(k) for k in ks], dtype=torch.float64)
        saved = torch.tensor([0.0] + [s.flops_saved(k) for k in ks], dtype=torch.float64)
        options.append((kept, saved))
    scale = len(layers) / target
    best = math.inf
    for lam in torch.logspace(-4, 4, 2000, dtype=torch.float64) * scale:
        value = sum(float((kept + lam * saved).max()) for kept, saved in options)
        best = min(best, value - float(lam) * target)
    return best


@pytest.mark.parametrize('fraction', [0.3, 0.6, 0.9])
def test_near_optimal_on_resnet50_like(fraction):
    layers = resnet50_like()
    target = fraction * max_removable(layers)
    ranks = allocate_ranks_by_energy(layers, target)
    check_allocation(layers, ranks, target)
    kept = normalized_energy_kept(layers, ranks)
    bound = lagrangian_bound(layers, target)
    assert bound - 0.02 <= kept <= bound + 1e-9, (kept, bound)


def test_matches_brute_force_on_small_random_layers():
    gen = torch.Generator().manual_seed(1)
    shapes = [(6, 12), (8, 8), (5, 20)]
    for trial in range(6):
        layers = {}
        for i, (m, n) in enumerate(shapes):
            sigma = torch.sort(torch.rand(min(m, n), generator=gen, dtype=torch.float64)
                               ** (1 + 4 * trial / 5), descending=True).values
            layers[f'l{i}'] = spectrum(m, n, sigma, flops=m * n * (1 + i))
        best = None
        for fraction in (0.1, 0.35, 0.7):
            target = fraction * max_removable(layers)
            ranks = allocate_ranks_by_energy(layers, target)
            check_allocation(layers, ranks, target)
            kept = normalized_energy_kept(layers, ranks)
            best = brute_force(layers, target)
            assert kept <= best + 1e-12
            assert kept >= best - 0.01  # greedy: near the exhaustive optimum
            uniform = uniform_reference(layers, target)
            assert kept >= normalized_energy_kept(layers, uniform) - 1e-12


def test_unreachable_budget_raises_with_the_maximum():
    layers = {'a': spectrum(64, 576, power_law(64, 1.0), extra=640),
              'b': spectrum(32, 32, power_law(32, 1.0)),      # k0 = 15
              'c': spectrum(8, 9, power_law(8, 1.0))}          # never pays at min_rank 5
    expected = max_removable(layers, 5, 1)
    assert expected == pytest.approx(64 * 576 * 100 * (1 - 5 * 640 / (64 * 576)) + 640
                                     + 32 * 32 * 100 * (1 - 5 * 64 / 1024))
    with pytest.raises(ValueError, match=f'removes at most .*{expected:.0f}'):
        allocate_ranks_by_energy(layers, expected * 1.001, min_rank=5)
    ranks = allocate_ranks_by_energy(layers, expected, min_rank=5)  # exactly reachable
    assert ranks == {'a': 5, 'b': 5}
    assert allocate_ranks_by_energy(layers, 0) == {}


def test_all_zero_energy_layer():
    zero = LayerSpectrum(64, 576, 64 * 576 * 100, torch.zeros(64))
    assert zero.energy_kept(1) == 1.0 and zero.energy_kept(None) == 1.0
    layers = {'real': spectrum(64, 576, power_law(64, 0.5)), 'zero': zero}
    # A budget the zero layer alone can cover costs no energy.
    target = 0.8 * zero.flops_saved(1)
    ranks = allocate_ranks_by_energy(layers, target)
    check_allocation(layers, ranks, target)
    assert list(ranks) == ['zero']
    assert normalized_energy_kept(layers, ranks) == 2.0
    # Beyond it, the zero layer goes to min rank and the other layer pays the rest.
    target = zero.flops_saved(1) + 0.3 * layers['real'].flops_saved(1)
    ranks = allocate_ranks_by_energy(layers, target)
    check_allocation(layers, ranks, target)
    assert ranks['zero'] == 1 and 'real' in ranks
    # Only zero layers: anything goes, nothing raises.
    ranks = allocate_ranks_by_energy({'z': zero}, zero.flops_saved(1))
    assert ranks == {'z': 1}


def test_deterministic_tie_breaking():
    def twin():
        return spectrum(64, 576, power_law(64, 1.0))

    target = 0.3 * twin().flops_saved(1)
    first = allocate_ranks_by_energy({'a': twin(), 'b': twin()}, target)
    assert first == allocate_ranks_by_energy({'a': twin(), 'b': twin()}, target)
    swapped = allocate_ranks_by_energy({'b': twin(), 'a': twin()}, target)
    # Ties go to the layer that comes first: the allocation follows the order, not the name.
    assert swapped == {'b' if k == 'a' else 'a': v for k, v in first.items()}
    # With zero spectra every move ties: the first layer takes them all.
    zero = {name: LayerSpectrum(64, 576, 64 * 576 * 100, torch.zeros(64)) for name in 'ab'}
    target = 0.5 * zero['a'].flops_saved(1)
    assert list(allocate_ranks_by_energy(zero, target)) == ['a']
    assert list(allocate_ranks_by_energy(dict(reversed(zero.items())), target)) == ['b']


def test_rank_plan_from_ranks():
    layers = {'a': spectrum(64, 576, power_law(64, 1.0)),
              'b': spectrum(64, 576, [1.0] * 64),
              'tiny': spectrum(1, 9, [1.0]),
              'noflops': spectrum(64, 64, power_law(64, 1.0), flops=0)}
    ranks = allocate_ranks_by_energy(layers, 0.3 * layers['a'].flops_saved(1))
    assert list(ranks) == ['a']
    plan = rank_plan_from_ranks(layers, ranks)
    assert isinstance(plan, RankPlan) and list(plan.layers) == ['a']
    assert plan.layers['a'].rank == ranks['a']
    assert plan.layers['a'].ratio == pytest.approx(1 - ranks['a'] / 64)
    assert 'budget' in plan.skipped['b']
    assert 'would not reduce parameters' in plan.skipped['tiny']
    assert 'no FLOPs' in plan.skipped['noflops']
    assert RankPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match='would not reduce'):
        rank_plan_from_ranks(layers, {'a': 60})
    with pytest.raises(ValueError, match='not in'):
        rank_plan_from_ranks(layers, {'zzz': 1})


def test_layer_spectrum_validation_and_from_weight():
    with pytest.raises(ValueError, match='length'):
        LayerSpectrum(4, 6, 100, torch.ones(5))
    with pytest.raises(ValueError, match='>= 0'):
        LayerSpectrum(4, 6, 100, torch.tensor([1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match='conv_flops'):
        LayerSpectrum(4, 6, -1, torch.ones(4))
    unsorted = LayerSpectrum(2, 6, 100, [1.0, 4.0])
    assert unsorted.energy.tolist() == [4.0, 1.0]
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    s = LayerSpectrum.from_weight(w, conv_flops=1000)
    assert (s.out_features, s.in_features) == (16, 72)
    assert float(s.energy.sum()) == pytest.approx(float(w.double().pow(2).sum()))
    expected = torch.linalg.svdvals(w.reshape(16, -1).double()) ** 2
    assert torch.allclose(s.energy, expected)
    with pytest.raises(ValueError, match='rank_multiple'):
        allocate_ranks_by_energy({'s': s}, 10, rank_multiple=0)
    with pytest.raises(ValueError, match='min_rank'):
        allocate_ranks_by_energy({'s': s}, 10, min_rank=0)


def test_resnet50_scale_is_fast():
    layers = resnet50_like()
    target = 0.5 * max_removable(layers)
    start = time.perf_counter()
    ranks = allocate_ranks_by_energy(layers, target)
    elapsed = time.perf_counter() - start
    check_allocation(layers, ranks, target)
    assert elapsed < 5.0, elapsed
