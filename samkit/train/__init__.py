"""Training SAM (paper App. A): ``samkit train --config FILE [--set key=value ...]``.

Modules, each readable on its own: :mod:`~samkit.train.config` (the run's knobs),
:mod:`~samkit.train.data` (sources, augmentation, batching), :mod:`~samkit.train.prompts`
(the interactive prompt simulator), :mod:`~samkit.train.losses`, :mod:`~samkit.train.optim`,
:mod:`~samkit.train.step` (one forward pass) and :mod:`~samkit.train.loop` (the loop, DDP,
checkpoints). See docs/training.md.
"""
