"""Optuna study over the learning rate and batch size of the U-Net that ``train`` trains.

A trial suggests a learning rate (log-uniform in ``[tune.lr_min, tune.lr_max]``) and a batch
size (categorical over ``tune.batch_sizes``), then trains a fresh U-Net for ``tune.epochs``
epochs (no early stopping) on each fold of ``tune.folds`` in turn. Architecture, loss,
augmentation and precision come from the ``train`` section, so the tuned values fit the model
that ``train`` builds. The trial's value is the mean over its folds of the best epoch's
validation Dice (pooled 2-D Dice, as ``train`` selects its epoch by); the study maximises it.

One module per concern, each the only owner of its names (each imports only those above it):

* :mod:`~liverseg.tuning.best_params`: ``best_params.json``, written here, read by ``train``;
* :mod:`~liverseg.tuning.objective`: the objective, its per-trial MLflow run and the per-epoch
  report to Optuna (pruning);
* :mod:`~liverseg.tuning.study`: study identity (inputs, name, sampler seed), its pruner,
  creating or resuming a study, counting its trials, failing dead workers' trials;
* :mod:`~liverseg.tuning.storage`: the study storage a ``tune.storage`` URL names (SQLite,
  PostgreSQL/MySQL, journal file), password redaction, SQLite's busy timeout, the heartbeat;
* :mod:`~liverseg.tuning.generations`: the one way trials run, in this process or in worker
  processes, on this machine or on many;
* :mod:`~liverseg.tuning.report`: the summary (``best_params.json``) and the study's plots.

The stage itself (its MLflow run ``study-<name>``, the report) is :mod:`liverseg.stages.tune`.
"""
