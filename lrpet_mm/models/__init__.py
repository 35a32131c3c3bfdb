"""The compact model: the registered ``LRPETFactorized`` builder, factorization of a trained
model / checkpoint into cascaded low-rank convs / linear layers, and decompose-then-finetune
(LRA); a package-made pretrained ResNet deep-stem backbone."""
from .compact_model import (
    CompactModel,
    FactorizedLayer,
    NotLowRankError,
    describe_layers,
    factorize_model,
    measure_rank_errors,
    planned_layers,
)
from .decompose import (
    DecomposedLayer,
    DecomposedModel,
    components_of,
    decompose_model,
    fold_factorized_norms,
)
from .factorize_checkpoint import (
    FactorizeOutput,
    build_model_from_config,
    compact_config,
    factorize_checkpoint,
    load_config,
)
from .factorized_module import LRPETFactorized
from .pretrained_backbone import PretrainedBackbone, PretrainSettings, pretrained_backbone

__all__ = ['CompactModel', 'FactorizedLayer', 'NotLowRankError', 'describe_layers',
           'factorize_model',
           'measure_rank_errors', 'planned_layers', 'LRPETFactorized', 'FactorizeOutput',
           'build_model_from_config', 'compact_config', 'factorize_checkpoint', 'load_config',
           'DecomposedLayer', 'DecomposedModel', 'components_of', 'decompose_model',
           'fold_factorized_norms', 'pretrained_backbone', 'PretrainSettings',
           'PretrainedBackbone']
