"""Dataset files: the data directory, downloads with checksums, and raw-format readers."""

from qlrlab.data.download import (
    DATASET_FILES,
    MIRROR_ENV_VAR,
    REMOTE_FILES,
    ChecksumError,
    DataUnavailableError,
    RemoteFile,
    download_file,
    ensure_dataset,
    ensure_file,
    file_digest,
    verify_file,
)
from qlrlab.data.formats import (
    build_vocab,
    load_cifar10,
    load_svhn_mat,
    read_cifar_batch,
    read_idx,
    read_permutation,
    read_ptb_words,
    read_uci_txt,
)
from qlrlab.data.paths import ENV_VAR, PACKAGE_DATA, get_data_dir, set_default_data_dir

__all__ = [
    "DATASET_FILES",
    "ENV_VAR",
    "MIRROR_ENV_VAR",
    "PACKAGE_DATA",
    "REMOTE_FILES",
    "ChecksumError",
    "DataUnavailableError",
    "RemoteFile",
    "build_vocab",
    "download_file",
    "ensure_dataset",
    "ensure_file",
    "file_digest",
    "get_data_dir",
    "load_cifar10",
    "load_svhn_mat",
    "read_cifar_batch",
    "read_idx",
    "read_permutation",
    "read_ptb_words",
    "read_uci_txt",
    "set_default_data_dir",
    "verify_file",
]
