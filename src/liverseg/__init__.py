"""liverseg: liver segmentation in abdominal CT with a 2D U-Net (DVC + MLflow + Optuna)."""

__version__ = "0.1.0"
