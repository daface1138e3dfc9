"""Optuna study over the learning rate and batch size of the U-Net that ``train`` trains.

A trial trains a fresh U-Net for ``tune.epochs`` epochs on each fold of ``tune.folds``; its
value is the mean of the folds' best validation Dice. Modules, each importing only those above:
``best_params`` (the stage's result file), ``objective`` (a trial and its MLflow run),
``study`` (``tune.storage`` URLs, identity, pruner, bookkeeping), ``generations`` (the one way
trials run) and ``report``. The stage is :mod:`liverseg.stages.tune`.
"""
