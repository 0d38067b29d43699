"""What the benchmark registrations share: the on-disk description of a benchmark, record
building, idempotent registration, the semi-supervised split loaders, and a multi-process
map with a progress bar for the prepare scripts.

Registration does no file I/O: every check (dataset folder present, label files present,
split list present and consistent) happens when a dataset is loaded, and a missing piece
raises an error naming the expected path and the command that creates it.
"""

import logging
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from tqdm import tqdm

from hiervl.data import split_files
from hiervl.data.image_io import image_size

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
EVALUATOR_TYPE = "sem_seg"
# Image headers are read concurrently: the work is file-system latency, not CPU.
_SIZE_THREADS = 16
# Missing files listed in an error message before "...".
_MAX_LISTED = 5


class DatasetNotFoundError(FileNotFoundError):
    """A dataset (or a file it needs) is not where the registration expects it."""


def default_root() -> str:
    """``$DETECTRON2_DATASETS`` or ``./datasets`` (detectron2's convention)."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark lies on disk and what its registered parts are called.

    Attributes:
        key: name prefix of the registered parts and the split folder (``voc``).
        dir_name: the dataset's folder relative to the datasets root.
        prepare_script: the script under ``datasets/`` that builds the tree.
        classes: class names; class ``k`` has label value ``k`` in the label PNGs.
        train_name: name of the fully labelled train set (``voc_train_aug``).
        label_counts: labelled-image counts of the published semi-supervised splits.
        image_root, sem_seg_root: image / label folders relative to ``dir_name``
            (informational metadata; records carry full paths).
        list_images: ``(dataset_root, "train" | "val") -> image paths`` relative to the
            dataset root, sorted. Raises DatasetNotFoundError when they cannot be listed.
        label_file: ``(dataset_root, image_path) -> absolute label path``.
        image_id: ``image_path -> id`` (unique within the benchmark).
        colors: the official palette, RGB per class (``stuff_colors`` metadata).
    """

    key: str
    dir_name: str
    prepare_script: str
    classes: Tuple[str, ...]
    train_name: str
    label_counts: Tuple[int, ...]
    image_root: str
    sem_seg_root: str
    list_images: Callable[[str, str], List[str]]
    label_file: Callable[[str, str], str]
    image_id: Callable[[str], str]
    colors: Sequence[Sequence[int]] = ()

    def __post_init__(self):
        assert not self.colors or len(self.colors) == len(self.classes), f"{self.key} palette"

    def dataset_root(self, root: str) -> str:
        return os.path.join(root, self.dir_name)

    def hint(self) -> str:
        return f"prepare it with `python datasets/{self.prepare_script}` (see datasets/README.md)"


def require_dir(path: str, what: str, hint: str) -> None:
    """Raise DatasetNotFoundError unless ``path`` is a folder."""
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"{what} not found: expected the folder {path}; {hint}")


def list_files(folder: str, suffix: str, what: str, hint: str) -> List[str]:
    """Sorted names of the files in ``folder`` ending with ``suffix``."""
    require_dir(folder, what, hint)
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.endswith(suffix))


def image_sizes(paths: Sequence[str]) -> List[Tuple[int, int]]:
    """(height, width) of each image as displayed (EXIF orientation applied, the size the
    mappers read), from its header only; ``ImageReadError`` naming an unreadable file."""
    if len(paths) < _SIZE_THREADS:
        return [image_size(p) for p in paths]
    with ThreadPoolExecutor(_SIZE_THREADS) as pool:
        return list(pool.map(image_size, paths))


def make_records(
    images: Sequence[str], labels: Optional[Sequence[str]], ids: Sequence[str]
) -> List[Dict[str, Any]]:
    """detectron2 semantic-segmentation dicts; ``labels=None`` gives unlabelled dicts, which
    have no ``sem_seg_file_name`` at all (labels never reach the unlabelled stream)."""
    assert labels is None or len(labels) == len(images), "one label per image"
    records = []
    for i, (path, (height, width)) in enumerate(zip(images, image_sizes(images))):
        record = {"file_name": path, "height": height, "width": width, "image_id": ids[i]}
        if labels is not None:
            record["sem_seg_file_name"] = labels[i]
        records.append(record)
    return records


def register(name: str, loader: Callable[[], List[Dict]], metadata: Dict[str, Any]) -> None:
    """Register ``name``, replacing an earlier registration of it (so calling a
    ``register_*`` function twice, or with another root, is harmless)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def _labelled_records(bench: Benchmark, droot: str, images: Sequence[str]) -> List[Dict]:
    labels = [bench.label_file(droot, image) for image in images]
    missing = [label for label in labels if not os.path.isfile(label)]
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED])
        raise DatasetNotFoundError(
            f"{bench.key}: {len(missing)} label files are missing ({shown}"
            f"{', ...' if len(missing) > _MAX_LISTED else ''}); {bench.hint()}"
        )
    paths = [os.path.join(droot, image) for image in images]
    return make_records(paths, labels, [bench.image_id(image) for image in images])


def load_part(bench: Benchmark, root: str, part: str) -> List[Dict]:
    """All images of ``part`` ("train" | "val"), labelled."""
    droot = bench.dataset_root(root)
    require_dir(droot, f"{bench.key} dataset", bench.hint())
    return _labelled_records(bench, droot, bench.list_images(droot, part))


def load_split(bench: Benchmark, root: str, count: int, labeled: bool) -> List[Dict]:
    """The labelled images of the ``count`` split, or the rest of the train set (without
    labels). Checks the list against the train set on disk and the two parts for overlap."""
    droot = bench.dataset_root(root)
    require_dir(droot, f"{bench.key} dataset", bench.hint())
    directory = split_files.split_dir(root, bench.key, count)
    labeled_path = os.path.join(directory, split_files.LABELED_FILE)
    if not os.path.isfile(labeled_path):
        raise DatasetNotFoundError(
            f"split list {labeled_path} not found; create it with `python -m hiervl.data.splits "
            f"fetch --datasets {bench.key} --counts {count}` (or `import` a local list, or "
            "`generate` a seeded one)"
        )
    if split_files.read_source(directory).get("kind") == split_files.SEEDED_KIND:
        logger.warning("%s is a seeded split, NOT the published one", labeled_path)
    labeled_images = split_files.read_list(labeled_path)
    if len(labeled_images) != count:
        raise ValueError(f"{labeled_path} lists {len(labeled_images)} images, expected {count}")
    train = bench.list_images(droot, "train")
    split_files.check_subset(labeled_images, train, labeled_path)
    unlabeled_path = os.path.join(directory, split_files.UNLABELED_FILE)
    if os.path.isfile(unlabeled_path):
        unlabeled = split_files.read_list(unlabeled_path)
        split_files.check_subset(unlabeled, train, unlabeled_path)
    else:
        unlabeled = split_files.complement(train, labeled_images, labeled_path)
    split_files.check_disjoint(labeled_images, unlabeled, directory)
    if labeled:
        return _labelled_records(bench, droot, labeled_images)
    paths = [os.path.join(droot, image) for image in unlabeled]
    return make_records(paths, None, [bench.image_id(image) for image in unlabeled])


def register_benchmark(bench: Benchmark, root: str) -> List[str]:
    """Register ``<train_name>``, ``<key>_val`` and, per label count n,
    ``<key>_train_labeled_<n>`` / ``<key>_train_unlabeled_<n>``; returns the names."""
    droot = bench.dataset_root(root)
    metadata = {
        "stuff_classes": list(bench.classes),
        "ignore_label": IGNORE_LABEL,
        "evaluator_type": EVALUATOR_TYPE,
        "dataset_root": droot,
        "image_root": os.path.join(droot, bench.image_root),
        "sem_seg_root": os.path.join(droot, bench.sem_seg_root),
    }
    if bench.colors:
        metadata["stuff_colors"] = [list(c) for c in bench.colors]
    parts: Dict[str, Tuple[Callable[[], List[Dict]], Dict[str, Any]]] = {
        bench.train_name: (lambda: load_part(bench, root, "train"), {}),
        f"{bench.key}_val": (lambda: load_part(bench, root, "val"), {}),
    }
    for n in bench.label_counts:
        extra = {"split_dir": split_files.split_dir(root, bench.key, n), "labeled_count": n}
        for labeled, kind in ((True, "labeled"), (False, "unlabeled")):
            parts[f"{bench.key}_train_{kind}_{n}"] = (
                lambda n=n, labeled=labeled: load_split(bench, root, n, labeled),
                extra,
            )
    for name, (loader, extra) in parts.items():
        register(name, loader, {**metadata, **extra})
    return list(parts)


def parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], *, total: int, workers: int, desc: str
) -> List[Any]:
    """``[fn(item) for item in items]`` in ``workers`` processes (in-process when
    ``workers <= 1``), with a tqdm progress bar (rate and ETA); results in input order."""
    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
    results = []
    try:
        if workers <= 1:
            for item in items:
                results.append(fn(item))
                bar.update()
        else:
            with multiprocessing.Pool(workers) as pool:
                for result in pool.imap(fn, items, chunksize=16):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return results
