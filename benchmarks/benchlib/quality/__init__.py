"""Evidence benchmark: LRPET against decompose-then-finetune and channel pruning, fine-tuned
from a pretrained backbone, with paired seeds.

One task per run (``--tasks det`` or ``--tasks seg``): the upstream VOC Faster R-CNN / PSPNet
configs at CPU size (the toy configs in ``configs/lrpet/_toy_`` with a ResNet-18 deep-stem
backbone) are fine-tuned on VOC-layout data from a backbone the package pretrains on a
synthetic classification task (:func:`benchlib.pretrained_backbone.pretrained_backbone`,
cached on disk, loaded through ``init_cfg=dict(type='Pretrained')``). Rows
(:data:`~benchlib.quality.configs.ROWS`), every one trained for ``T`` iterations in all:

=============== ==========================================================================
baseline        the uncompressed network, ``T`` iterations
lrpet           ``LRPETHook(flops_reduction=r)`` with its defaults, ``T``
paper           LRPETHook as the paper: ``bn_recovery='eq16'``, uniform ranks, ``T``
lra_half        LRA at equal budget: the baseline's checkpoint at ``T/2``, truncated SVD at
                the uniform ranks, fine-tuned ``T/2`` continuing the schedule
lra_pretrained  LRA from the pretrained backbone: truncated SVD, then ``T``
prune           channel pruning (Torch-Pruning, L2 magnitude of the blocks' inner channels)
                of the baseline at ``T/2`` to the same backbone FLOPs, fine-tuned ``T/2``
=============== ==========================================================================

Seeds are paired: seed ``s`` gives every row the same initial weights (one initial checkpoint
per seed: pretrained backbone + heads initialised with ``torch.manual_seed(s)``), the same
data order (``InfiniteSampler(seed=s)``) and the same test set. Every compressed row is
evaluated as the model a user deploys (factorized, BNs folded; or pruned). The latency column
times each row's deployed backbone of seed 0 in ONNX Runtime, all rows interleaved in one run.

The modules, by job:

- :mod:`~benchlib.quality.configs`: the rows, tasks and settings of the protocol, and the
  mmengine config each row trains;
- :mod:`~benchlib.quality.statistics`: mean ± std, paired differences, t intervals, power;
- :mod:`~benchlib.quality.tables`: the Markdown report and the JSON / Markdown results files;
- :mod:`~benchlib.quality.orchestration`: running the rows and seeds
  (:func:`~benchlib.quality.orchestration.run_benchmark`); ``benchmarks/bench_quality.py`` is
  the command line.
"""
