"""batch-classify: run an image classifier over a whole dataset on many GPUs."""

__version__ = "0.1.0"
