"""Benchmarks with the SAM paper's zero-shot protocols (``samkit eval``).

* :mod:`samkit.eval.points` -- interactive points and boxes (§7.1, App. D.1)
* :mod:`samkit.eval.edges` -- BSDS500 edge detection (§7.2, App. D.2)
* :mod:`samkit.eval.proposals` -- object proposals, average recall (§7.3, App. D.3)
* :mod:`samkit.eval.instances` -- instance segmentation from boxes, mask AP (§7.4)

Methods are reached through :class:`samkit.eval.predictors.PromptPredictor`, so baselines
and test doubles run through the same harness as the model. See ``docs/eval.md``.
"""
