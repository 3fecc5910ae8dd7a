"""The data engine (paper §4): annotate with the model in the loop, then let it annotate.

``samkit annotate PROJECT_DIR`` serves a web app for model-assisted manual annotation
(stage 1) and for reviewing automatically proposed masks (stage 2); ``samkit engine auto``
segments everything in the images nobody annotated (stage 3); ``samkit engine retrain``
fine-tunes the model on the accepted masks; ``stats`` and ``export`` report and hand the data
on. Modules: :mod:`~samkit.engine.project` (the folder), :mod:`~samkit.engine.db` (SQLite),
:mod:`~samkit.engine.model_service` (the shared model and its embeddings),
:mod:`~samkit.engine.stages`, :mod:`~samkit.engine.server` and :mod:`~samkit.engine.security`
(the web app), :mod:`~samkit.engine.export`, :mod:`~samkit.engine.retrain`,
:mod:`~samkit.engine.stats`. See docs/engine.md.
"""
