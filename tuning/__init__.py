"""``gorp tune``: Ray Tune over whole continual sequences (search file: :mod:`tuning.search`; the validation split or
a held-out slice: :mod:`tuning.holdout`; one trial: :mod:`tuning.trial`; the search: :mod:`tuning.run`; MLflow:
:mod:`tuning.lineage`; table, trials.csv, best.yaml, plot: :mod:`tuning.report`). Uses ``pipelines`` and ``gorp``,
never the reverse."""
