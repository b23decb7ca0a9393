"""Data loading: built-in Fashion-MNIST and spec strings for user data."""

from quantlab.data.errors import CorruptDataError, DataNotFoundError, DataShapeError, EmptyDataError, HubUnreachableError
from quantlab.data.fmnist import load_fmnist
from quantlab.data.spec import load_data, register_dataset, registered_datasets

__all__ = [
    "CorruptDataError",
    "DataNotFoundError",
    "DataShapeError",
    "EmptyDataError",
    "HubUnreachableError",
    "load_data",
    "load_fmnist",
    "register_dataset",
    "registered_datasets",
]
