"""On-disk semi-supervised split lists: where they live, how they are read and checked.

A split of benchmark ``<key>`` with ``n`` labelled images lives in
``<root>/splits/<key>/<n>/``:

- ``labeled.txt``: one labelled image per line, ``image_path [label_path]`` relative to the
  dataset's folder (the published format). Only the image path is used; the label path is
  derived from the dataset's own layout. Lines starting with ``#`` are comments.
- ``unlabeled.txt`` (optional): one image path per line, the train set minus the labelled
  images. When absent it is derived at load time.
- ``source.json``: where the list came from: ``{"kind": "published" | "imported" |
  "seeded", ...}``. Seeded lists are not the published ones and say so in a header.

Both the split tool (:mod:`hiervl.data.splits`) and the registrations
(:mod:`hiervl.data.datasets`) use these functions, so this module imports neither.
"""

import json
import logging
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

logger = logging.getLogger(__name__)

LABELED_FILE = "labeled.txt"
UNLABELED_FILE = "unlabeled.txt"
SOURCE_FILE = "source.json"
SEEDED_KIND = "seeded"
# How many offending entries an error message lists before "...".
_MAX_LISTED = 5


def split_dir(root: str, key: str, count: int) -> str:
    """Folder of benchmark ``key``'s split with ``count`` labelled images."""
    return os.path.join(root, "splits", key, str(count))


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def parse_list(text: str, where: str) -> List[str]:
    """Image paths (first column) of a list file's text, in order.

    Blank lines and ``#`` comments are skipped; a last line without a newline is read like
    any other. Raises ValueError naming ``where`` on a line with more than two columns or a
    repeated image.
    """
    images: List[str] = []
    seen = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        columns = line.split()
        if len(columns) > 2:
            raise ValueError(f"{where}:{number}: expected 'image_path [label_path]', got {line!r}")
        if columns[0] in seen:
            raise ValueError(f"{where}:{number}: image {columns[0]} is listed twice")
        seen.add(columns[0])
        images.append(columns[0])
    return images


def read_list(path: str) -> List[str]:
    """Image paths of the list file at ``path`` (see :func:`parse_list`)."""
    with open(path, encoding="utf-8") as f:
        return parse_list(f.read(), path)


def read_source(directory: str) -> Dict:
    """The ``source.json`` record of a split folder ({} when absent)."""
    path = os.path.join(directory, SOURCE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_disjoint(labeled: Iterable[str], unlabeled: Iterable[str], where: str) -> None:
    """Raise ValueError when an image is both labelled and unlabelled."""
    both = sorted(set(labeled) & set(unlabeled))
    if both:
        raise ValueError(
            f"{where}: {len(both)} images are both labelled and unlabelled: {_listed(both)}"
        )


def check_subset(images: Sequence[str], train: Iterable[str], where: str) -> None:
    """Raise ValueError when listed images are not in the dataset's train set."""
    train_set = set(train)
    missing = [image for image in images if image not in train_set]
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} listed images are not in the train set on disk: "
            f"{_listed(missing)}"
        )


def complement(train: Sequence[str], labeled: Sequence[str], where: str) -> List[str]:
    """The train images that are not labelled, in train order (the unlabelled set)."""
    check_subset(labeled, train, where)
    labeled_set = set(labeled)
    return [image for image in train if image not in labeled_set]


def _write_atomic(path: str, data: bytes) -> None:
    # Write-then-rename: a crash or a concurrent reader never sees half a list.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_split(
    directory: str,
    *,
    labeled_bytes: bytes,
    source: Dict,
    unlabeled: Optional[Sequence[str]] = None,
) -> None:
    """Write a split folder: ``labeled.txt`` verbatim, ``source.json``, and ``unlabeled.txt``
    when ``unlabeled`` is given (a stale one is removed otherwise)."""
    labeled = parse_list(labeled_bytes.decode("utf-8"), os.path.join(directory, LABELED_FILE))
    os.makedirs(directory, exist_ok=True)
    _write_atomic(os.path.join(directory, LABELED_FILE), labeled_bytes)
    unlabeled_path = os.path.join(directory, UNLABELED_FILE)
    if unlabeled is not None:
        check_disjoint(labeled, unlabeled, directory)
        _write_atomic(unlabeled_path, "".join(f"{image}\n" for image in unlabeled).encode())
    elif os.path.exists(unlabeled_path):
        os.remove(unlabeled_path)
    text = json.dumps(source, indent=2, sort_keys=True) + "\n"
    _write_atomic(os.path.join(directory, SOURCE_FILE), text.encode())
