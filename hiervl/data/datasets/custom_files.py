"""Which files make up each part of a custom dataset (no file is decoded here).

Scans image trees (nested sub-folders, any of :data:`IMAGE_EXTENSIONS`), pairs images
with masks (the mask of ``<images>/<sub>/<stem>.<ext>`` is ``<masks>/<sub>/<stem>.png``),
resolves split-file entries and draws seeded fractions. Pairing problems (an image without
its mask, a mask without its image, two images with one stem) are returned as text lines
naming the files; a missing folder raises :class:`DatasetNotFoundError`.
"""

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from hiervl.data import split_files
from hiervl.data.datasets.common import DatasetNotFoundError
from hiervl.data.validation import Sample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSION = ".png"


def _walk(folder: str) -> List[Tuple[str, str]]:
    """(key, path) of every file below ``folder``; key = the path below it, '/'-separated.
    Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        relative = os.path.relpath(directory, folder)
        for name in sorted(files):
            if name.startswith("."):
                continue
            key = name if relative == "." else f"{relative.replace(os.sep, '/')}/{name}"
            found.append((key, os.path.join(directory, name)))
    return found


def require_folder(path: str, what: str, key: str) -> None:
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"{what} not found: expected the folder {path} (set {key})")


def scan_images(folder: str, what: str, key: str) -> Tuple[Dict[str, str], List[str]]:
    """Images below ``folder``: ({id: path}, problems); id = path below it, no extension."""
    require_folder(folder, what, key)
    images: Dict[str, str] = {}
    problems = []
    for name, path in _walk(folder):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in images:
            problems.append(
                f"{images[stem]} and {path} share the name {stem!r}: a mask could belong to "
                "either (rename one)"
            )
            continue
        images[stem] = path
    if not images:
        problems.append(f"{what} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images, problems


def scan_masks(folder: str, what: str, key: str) -> Dict[str, str]:
    """PNG masks below ``folder``: {id: path}."""
    require_folder(folder, what, key)
    return {
        name[: -len(MASK_EXTENSION)]: path
        for name, path in _walk(folder)
        if name.lower().endswith(MASK_EXTENSION)
    }


def mask_path(mask_folder: str, image_id: str) -> str:
    return os.path.join(mask_folder, *image_id.split("/")) + MASK_EXTENSION


def pair(
    images: Dict[str, str], masks: Dict[str, str], mask_folder: str, image_folder: str
) -> Tuple[List[Sample], List[str], List[str]]:
    """Labelled samples of ``images``, the images without a mask and the masks without an
    image (both as problem lines naming the file and what was expected)."""
    samples, no_mask, no_image = [], [], []
    for image_id, path in images.items():
        if image_id in masks:
            samples.append(Sample(path, masks[image_id], image_id))
        else:
            expected = mask_path(mask_folder, image_id)
            no_mask.append(f"image {path} has no mask (expected {expected})")
    for image_id, path in masks.items():
        if image_id not in images:
            expected = os.path.join(image_folder, *image_id.split("/")) + ".<jpg|png|...>"
            no_image.append(f"mask {path} has no image (expected {expected})")
    return samples, no_mask, no_image


def resolve_entries(
    path: str, entries: Sequence[str], images: Dict[str, str], root: str, image_dir: str
) -> List[str]:
    """Image ids named by the entries of the split file ``path``.

    An entry is an id (``train/0001``), a file name below the image folder
    (``train/0001.jpg``), a path relative to ROOT (``images/train/0001.jpg``) or absolute,
    or a bare stem when only one image has it. ValueError names the file and the unknown
    entries.
    """
    by_stem: Dict[str, List[str]] = {}
    for image_id in images:
        by_stem.setdefault(image_id.rsplit("/", 1)[-1], []).append(image_id)
    prefix = image_dir.strip("/").replace(os.sep, "/") + "/"
    ids, unknown = [], []
    for entry in entries:
        name = os.path.relpath(entry, root) if os.path.isabs(entry) else entry
        name = os.path.normpath(name).replace(os.sep, "/")
        stem, ext = os.path.splitext(name)
        key = stem if ext.lower() in IMAGE_EXTENSIONS else name
        candidates = [key[len(prefix) :]] if key.startswith(prefix) else []
        candidates.append(key)
        found = next((c for c in candidates if c in images), None)
        if found is None and "/" not in key and len(by_stem.get(key, [])) == 1:
            found = by_stem[key][0]
        if found is None:
            unknown.append(entry)
        else:
            ids.append(found)
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} entries name no image of the folder: {unknown[:5]}"
        )
    return ids


def read_split(path: str, root: str, images: Dict[str, str], image_dir: str) -> List[str]:
    path = path if os.path.isabs(path) else os.path.join(root, path)
    if not os.path.isfile(path):
        raise ValueError(f"custom split file {path} does not exist")
    return resolve_entries(path, split_files.read_list(path), images, root, image_dir)


def draw(ids: Sequence[str], count: int, seed) -> List[str]:
    """``count`` of ``ids``, a seeded draw, sorted."""
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:count])
