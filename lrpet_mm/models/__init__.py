from .compact_model import (CompactModel, FactorizedLayer, NotLowRankError, factorize_model,
                            measure_rank_errors, planned_layers)
from .factorized_module import (LRPETFactorized, apply_factorized_structure,
                                empty_factorized_conv, set_submodule)

__all__ = ['CompactModel', 'FactorizedLayer', 'NotLowRankError', 'factorize_model',
           'measure_rank_errors', 'planned_layers', 'LRPETFactorized', 'apply_factorized_structure',
           'empty_factorized_conv', 'set_submodule']

from .factorize_checkpoint import (FactorizeOutput, build_model_from_config,  # noqa: E402
                                   compact_config, factorize_checkpoint, load_config)

__all__ += ['FactorizeOutput', 'build_model_from_config', 'compact_config',
            'factorize_checkpoint', 'load_config']

from .decompose import (DecomposedLayer, DecomposedModel, components_of,  # noqa: E402
                        decompose_model, fold_factorized_norms)

__all__ += ['DecomposedLayer', 'DecomposedModel', 'components_of', 'decompose_model',
            'fold_factorized_norms']
