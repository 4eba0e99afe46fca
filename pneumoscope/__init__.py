"""pneumoscope: train, evaluate, explain and serve a chest X-ray pneumonia classifier."""

__version__ = "0.1.0"
CLASSES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
