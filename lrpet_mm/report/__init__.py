"""The report of an LRPET run: projected vs compact model (FLOPs, parameters, task metric,
kept ranks and spectra)."""
from .complexity import FLOPS_CONVENTION, measure_complexity
from .evaluation import EvaluationError, evaluate_checkpoint, primary_metric
from .report import REPORT_FILES, generate_report

__all__ = ['FLOPS_CONVENTION', 'measure_complexity', 'EvaluationError',
           'evaluate_checkpoint', 'primary_metric', 'REPORT_FILES', 'generate_report']
