"""Demo model entry point for the CLI: ``quantlab ... examples/fmnist.py:build``."""

from quantlab.models import pretrained_fmnist_cnn


def build():
    """Return the pretrained Fashion-MNIST residual CNN (trains once, then cached)."""
    return pretrained_fmnist_cnn()
