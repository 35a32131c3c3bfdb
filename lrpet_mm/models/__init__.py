"""The compact model: the registered ``LRPETFactorized`` builder and the factorization of a
trained model / checkpoint into cascaded low-rank convs / linear layers."""
from .compact_model import (
    CompactModel,
    FactorizedLayer,
    NotLowRankError,
    describe_layers,
    factorize_model,
    measure_rank_errors,
    planned_layers,
)
from .factorize_checkpoint import (
    FactorizeOutput,
    build_model_from_config,
    compact_config,
    factorize_checkpoint,
    load_config,
)
from .factorized_module import LRPETFactorized

__all__ = ['CompactModel', 'FactorizedLayer', 'NotLowRankError', 'describe_layers',
           'factorize_model',
           'measure_rank_errors', 'planned_layers', 'LRPETFactorized', 'FactorizeOutput',
           'build_model_from_config', 'compact_config', 'factorize_checkpoint', 'load_config']
