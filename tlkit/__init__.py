"""tlkit: transfer-learning application kit for image recognition."""

__version__ = "0.1.0"
