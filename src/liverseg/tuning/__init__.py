"""Optuna study over the learning rate and batch size of the U-Net that ``train`` trains.

A trial suggests a learning rate (log-uniform in ``[tune.lr_min, tune.lr_max]``) and a batch
size (categorical over ``tune.batch_sizes``), then trains a fresh U-Net for ``tune.epochs``
epochs (no early stopping) on each fold of ``tune.folds`` in turn. Architecture, loss,
augmentation and precision come from the ``train`` section, so the tuned values fit the model
that ``train`` builds. The trial's value is the mean over its folds of the best epoch's
validation Dice (pooled 2-D Dice, as ``train`` selects its epoch by); the study maximises it.

One module per concern, each the only owner of its names:

* :mod:`~liverseg.tuning.storage`: the study storage a ``tune.storage`` URL names (SQLite,
  PostgreSQL/MySQL, journal file), password redaction, SQLite's busy timeout, the heartbeat;
* :mod:`~liverseg.tuning.study`: study identity (inputs, name, sampler seed), creating or
  resuming a study, counting its trials, failing dead workers' trials, running it;
* :mod:`~liverseg.tuning.objective`: the objective, its per-trial MLflow run and the per-epoch
  report to Optuna (pruning);
* :mod:`~liverseg.tuning.report`: the summary (``best_params.json``) and the study's plots;
* :mod:`~liverseg.tuning.stop`: SIGINT/SIGTERM turned into a stop where that is safe.
"""
