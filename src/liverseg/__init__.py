"""liverseg: liver segmentation in abdominal CT with a 2D U-Net (DVC + MLflow + Optuna)."""

__version__ = "0.1.0"


def tensorflow_distribution() -> str:
    """The installed TensorFlow distribution: ``tensorflow-cpu`` (the ``cpu`` extra) or
    ``tensorflow`` (the ``gpu`` extra), for the pip requirements logged with a model."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            version(dist)
        except PackageNotFoundError:
            continue
        return dist
    return "tensorflow"
