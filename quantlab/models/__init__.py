"""Built-in models: the Fashion-MNIST demo CNN and a generic training loop."""

from quantlab.models.fmnist import FmnistCNN, ResidualBlock, build_fmnist_cnn, default_cache_dir, pretrained_fmnist_cnn
from quantlab.models.train import TrainProgress, train_classifier

__all__ = [
    "FmnistCNN",
    "ResidualBlock",
    "TrainProgress",
    "build_fmnist_cnn",
    "default_cache_dir",
    "pretrained_fmnist_cnn",
    "train_classifier",
]
