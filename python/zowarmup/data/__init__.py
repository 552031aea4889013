"""Data for ZOWarmUp: offline loaders (:mod:`.loaders`) and federated partitioning (:mod:`.partition`).

Loading: :class:`Dataset`, :func:`load_dataset` (digits, CIFAR-10/100, ImageNet32, MNIST, npz),
:func:`stratified_split`, :func:`read_idx`. Partitioning: :func:`dirichlet_partition`,
:func:`assign_resources`, :func:`sample_clients`, :func:`label_entropy`.
"""
from .loaders import DATASETS, Dataset, load_dataset, read_idx, stratified_split
from .partition import assign_resources, dirichlet_partition, label_entropy, sample_clients

__all__ = ["Dataset", "load_dataset", "DATASETS", "dirichlet_partition", "assign_resources",
           "sample_clients", "label_entropy", "stratified_split", "read_idx"]
