"""Read an LRPET checkpoint: its rank plan and how low-rank its weights really are."""
import os
from dataclasses import dataclass
from typing import List, Union

import torch

from ..lowrank import RankPlan, numerical_rank

#: Key of LRPETHook's state inside ``checkpoint['meta']``.
META_KEY = 'lrpet'
#: Top-level checkpoint key under which lrpet_mm before 2026-12 saved warm-start subspace
#: bases; read only to be ignored (with a log line) when such a checkpoint is resumed.
LEGACY_BASES_KEY = 'lrpet_bases'


def load_checkpoint_file(path: Union[str, os.PathLike]) -> dict:
    """Load a checkpoint dict on the CPU with a clear error for a missing or broken file.

    Like mmengine, this unpickles the file (``weights_only=False``): only load trusted files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # truncated zip, not a checkpoint, ...
        raise ValueError(f'checkpoint {path!r} could not be read ({type(e).__name__}: {e}); '
                         'is it truncated or not a PyTorch checkpoint?') from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, not a dict')
    return checkpoint


def rank_plan_from_checkpoint(checkpoint: dict, path: str = 'checkpoint') -> RankPlan:
    """The rank plan LRPETHook stored in ``checkpoint['meta']['lrpet']``."""
    state = (checkpoint.get('meta') or {}).get(META_KEY)
    if not state or not state.get('plan'):
        raise ValueError(f'{path} has no LRPET rank plan in its meta (was it trained with '
                         'LRPETHook?)')
    return RankPlan.from_dict(state['plan'])


@dataclass
class LayerRankCheck:
    """Planned rank k vs the numerical rank of the (BN-folded) weight stored in a checkpoint."""
    name: str
    shape: tuple
    planned_rank: int
    full_rank: int
    numerical_rank: int


def check_checkpoint_ranks(checkpoint: dict, plan: RankPlan,
                           rtol: float = 1e-5) -> List[LayerRankCheck]:
    """Numerical rank of each planned layer's conv weight in ``checkpoint['state_dict']``.

    After LRPET's last projection the conv weight itself has rank <= k (with BN rectification:
    W = α·W·V_kV_kᵀ for the default in-span recovery, W = diag(a/(a²+ε))·W'_k for eq. 16), so
    no BN folding is needed for this check.
    """
    state = checkpoint.get('state_dict', checkpoint)
    results = []
    for layer in plan.layers.values():
        key = f'{layer.name}.weight'
        if key not in state:
            raise KeyError(f'{key!r} of the rank plan is missing from the checkpoint')
        weight = state[key]
        results.append(LayerRankCheck(layer.name, tuple(weight.shape), layer.rank,
                                      layer.full_rank,
                                      numerical_rank(weight.reshape(weight.shape[0], -1), rtol)))
    return results
