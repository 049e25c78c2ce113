"""crossval: cross-framework verification of Caffe age-regression heads against PyTorch."""

__version__ = "0.1.0"
