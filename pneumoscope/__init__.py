"""pneumoscope: train, evaluate, explain and serve a chest X-ray pneumonia classifier.

The Python API (pneumoscope.api): `load(run_dir)` -> a model with .predict and .explain,
`train(data=..., out=..., **options)` -> the run directory, `adapt(run_dir, data, out)` ->
the adapted run directory. They load on first use, so
`import pneumoscope` does not import torch.
"""

__version__ = "0.1.0"
CLASSES = ("NORMAL", "PNEUMONIA")  # the class folders; a film's binary label is its index

__all__ = ["CLASSES", "__version__", "adapt", "load", "train"]


def __getattr__(name: str):
    if name in ("load", "train", "adapt", "Model"):
        from pneumoscope import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
