"""Split tool: the labelled lists of the semi-supervised benchmarks.

    python -m hiervl.data.splits fetch    [--datasets voc coco ...] [--counts 92 ...]
    python -m hiervl.data.splits import   --dataset voc --count 92 --file my_list.txt
    python -m hiervl.data.splits generate --dataset voc [--counts 92 ...] [--seed 0]
    python -m hiervl.data.splits list

(``--root`` everywhere; default ``$DETECTRON2_DATASETS`` or ``./datasets``.) Each writes
``<root>/splits/<dataset>/<n>/`` (see :mod:`hiervl.data.split_files`):

- ``fetch`` downloads the published list from its repository at a pinned commit and checks
  its sha256 (``--base-url`` points at a mirror or a local copy: ``file:///path/splits``);
- ``import`` takes a local list file (``image_path label_path`` lines);
- ``generate`` draws a seeded random list from the train set on disk, marked as NOT the
  published one (a header in ``labeled.txt``, ``source.json`` and a warning at every load).

``unlabeled.txt`` (train set minus labelled, checked disjoint) is written when the dataset
is on disk; otherwise the registrations derive it at load time.
"""

import argparse
import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from hiervl.data import split_files
from hiervl.data.datasets import BENCHMARKS, DatasetNotFoundError, default_root

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
# The published lists. VOC, COCO and Cityscapes 1/16..1/2 are UniMatch's (CVPR 2023);
# ADE20K and Cityscapes 1/30 (100 labels) were added by SemiVL (ECCV 2024), whose repository
# keeps the same splits/ layout. Commits pinned; sha256 of the files as published.
UNIMATCH = ("LiheYoung/UniMatch", "77cf3bfb5cc5ddf2fbd56a66c5b2b48d2d0ba122")
SEMIVL = ("google-research/semivl", "5c8d7f8700315c7935f5fbb8c46d877cd600c16b")


@dataclass(frozen=True)
class Published:
    """One published list: ``splits/<path>`` of ``repo`` at ``commit``."""

    repo: str
    commit: str
    path: str
    sha256: str

    def url(self, base_url: Optional[str] = None) -> str:
        if base_url:
            return f"{base_url.rstrip('/')}/{self.path}"
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/splits/{self.path}"


def _pub(source: Tuple[str, str], path: str, sha256: str) -> Published:
    return Published(repo=source[0], commit=source[1], path=path, sha256=sha256)


# (dataset, n): (source, path under the repository's splits/, sha256)
PUBLISHED: Dict[Tuple[str, int], Published] = {
    ("voc", 92): _pub(
        UNIMATCH, "pascal/92/labeled.txt",
        "8a02aa6a1253178b105bd25b36f0a27daeedf6b3959f399aa47d24783f3a8306",
    ),
    ("voc", 183): _pub(
        UNIMATCH, "pascal/183/labeled.txt",
        "de3f4680391cb15324402dae17ac0919933d0d9004c11a641c924f3f67147f9f",
    ),
    ("voc", 366): _pub(
        UNIMATCH, "pascal/366/labeled.txt",
        "74f6bd1e459a8b46fc204529d70b603769f8a45aef4553df8a5c04b5698e77b7",
    ),
    ("voc", 732): _pub(
        UNIMATCH, "pascal/732/labeled.txt",
        "02c8ec5b62e27364f5bc91eb95bccf54debaa721e9d31c50c07507aea258fd0f",
    ),
    ("voc", 1464): _pub(
        UNIMATCH, "pascal/1464/labeled.txt",
        "b20486876df309c57c8230e957b2957fff5392ff5cb11f225e8453ed6c50ba3e",
    ),
    ("coco", 232): _pub(
        UNIMATCH, "coco/1_512/labeled.txt",
        "bd0ff85bf2d35b4641d08c2201257ad5b5f02f85ea0da457f44f0b97c4caeb37",
    ),
    ("coco", 463): _pub(
        UNIMATCH, "coco/1_256/labeled.txt",
        "4cdf41b9d3b3afc3734057a605015860501199ed3680370ccb2c677fc159b127",
    ),
    ("coco", 925): _pub(
        UNIMATCH, "coco/1_128/labeled.txt",
        "06067c0fb879b8e6ab8f4bdab3dfa641e8e4da2990200fa156daa33670329d79",
    ),
    ("coco", 1849): _pub(
        UNIMATCH, "coco/1_64/labeled.txt",
        "622b84ccbb5dcba32f4f5bb4ffaf1a9cf3e3f1f460b55dc02605fd099ebf1337",
    ),
    ("coco", 3697): _pub(
        UNIMATCH, "coco/1_32/labeled.txt",
        "781b5990914f7422ee9e1f6325a914f289e077621b77b9cd066c2d01d33a939e",
    ),
    ("ade20k", 158): _pub(
        SEMIVL, "ade/1_128/labeled.txt",
        "5b28d705e511a35f89b19b997eb68febea76253a6bd88429b62cf4e8446f0d05",
    ),
    ("ade20k", 316): _pub(
        SEMIVL, "ade/1_64/labeled.txt",
        "78f423b10adcb3670e048c02bf43707430ede157036c195b61912dc4bf25602a",
    ),
    ("ade20k", 632): _pub(
        SEMIVL, "ade/1_32/labeled.txt",
        "0a2f3b29515a07ea912f256d49b650a8436b846f838f10b122799ef3b2395f93",
    ),
    ("ade20k", 1263): _pub(
        SEMIVL, "ade/1_16/labeled.txt",
        "85cb4de0a7896e90511e0ad5581f7b60a44d0896cfbdede01e11d1a55cb7b6f8",
    ),
    ("ade20k", 2526): _pub(
        SEMIVL, "ade/1_8/labeled.txt",
        "73d45bc89e256a85419ae72cf88fd86ffbadab0ed86b0a186cae77192815582e",
    ),
    ("cityscapes", 100): _pub(
        SEMIVL, "cityscapes/1_30/labeled.txt",
        "b11041fef70476fb5564af0ef006a8013622da9cf49c7faf4182f3e26eb32742",
    ),
    ("cityscapes", 186): _pub(
        UNIMATCH, "cityscapes/1_16/labeled.txt",
        "64195914dce1231133c7dc611fece213bc3a87fe4e0b73fbd96add7dfa8a2f46",
    ),
    ("cityscapes", 372): _pub(
        UNIMATCH, "cityscapes/1_8/labeled.txt",
        "97291dfc509a8c90ee94e1c5fd1f7668c21205b995f53b963ac133f0ed96ee8e",
    ),
    ("cityscapes", 744): _pub(
        UNIMATCH, "cityscapes/1_4/labeled.txt",
        "8edd24ae817eed7b49d0a06c95b7bfaf769002c98387e4edeab5e221ab7791c3",
    ),
    ("cityscapes", 1488): _pub(
        UNIMATCH, "cityscapes/1_2/labeled.txt",
        "90d8e29d4d182c3b3def3d1fac02e454868c4ca632f73696bb521aa05e937ee4",
    ),
}  # fmt: skip


class DownloadError(RuntimeError):
    """A published list could not be downloaded."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(url: str, *, sha256: str, timeout: float = DEFAULT_TIMEOUT_S) -> bytes:
    """The bytes at ``url`` (http(s):// or file://), checked against ``sha256``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot download {url}: {e}") from e
    actual = sha256_of(data)
    if actual != sha256:
        raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}")
    return data


def _check_count(key: str, count: int) -> None:
    counts = BENCHMARKS[key].label_counts if key in BENCHMARKS else ()
    if count not in counts:
        raise ValueError(f"unknown split {key}/{count}: known {key!r} counts are {counts}")


def _unlabeled_if_available(key: str, root: str, labeled: Sequence[str], where: str):
    """Train set minus ``labeled`` when the train set can be listed, else None."""
    bench = BENCHMARKS[key]
    try:
        train = bench.list_images(bench.dataset_root(root), "train")
    except DatasetNotFoundError as e:
        logger.info("%s; unlabeled.txt will be derived when the dataset is loaded", e)
        return None
    return split_files.complement(train, labeled, where)


def _write(key: str, count: int, root: str, data: bytes, source: Dict, where: str) -> str:
    labeled = split_files.parse_list(data.decode("utf-8"), where)
    if len(labeled) != count:
        raise ValueError(f"{where} lists {len(labeled)} images, expected {count}")
    directory = split_files.split_dir(root, key, count)
    unlabeled = _unlabeled_if_available(key, root, labeled, where)
    split_files.write_split(directory, labeled_bytes=data, source=source, unlabeled=unlabeled)
    extra = f", {len(unlabeled)} unlabelled" if unlabeled is not None else ""
    logger.info("%s/%d: %d labelled%s -> %s", key, count, count, extra, directory)
    return directory


def fetch(
    key: str, count: int, root: str, *, base_url: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> str:  # fmt: skip
    """Download (or re-use, when its checksum matches) the published list; returns the
    split folder."""
    _check_count(key, count)
    published = PUBLISHED[(key, count)]
    url = published.url(base_url)
    existing = os.path.join(split_files.split_dir(root, key, count), split_files.LABELED_FILE)
    data = None
    if os.path.isfile(existing):
        with open(existing, "rb") as f:
            data = f.read()
        if sha256_of(data) != published.sha256:
            data = None
    if data is None:
        logger.info("Downloading %s", url)
        data = download(url, sha256=published.sha256, timeout=timeout)
    source = {"kind": "published", "url": url, "sha256": published.sha256,
              "repo": published.repo, "commit": published.commit}  # fmt: skip
    return _write(key, count, root, data, source, url)


def import_list(key: str, count: int, root: str, path: str) -> str:
    """Copy a local ``image_path label_path`` list into the split folder."""
    _check_count(key, count)
    if not os.path.isfile(path):
        raise ValueError(f"split list {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    actual = sha256_of(data)
    matches = actual == PUBLISHED[(key, count)].sha256
    if not matches:
        logger.warning("%s is not byte-identical to the published %s/%d list", path, key, count)
    source = {"kind": "imported", "file": os.path.abspath(path), "sha256": actual,
              "matches_published": matches}  # fmt: skip
    return _write(key, count, root, data, source, path)


def generate(key: str, count: int, root: str, *, seed: int) -> str:
    """Draw ``count`` labelled images of the train set on disk with ``seed``."""
    _check_count(key, count)
    bench = BENCHMARKS[key]
    droot = bench.dataset_root(root)
    train = bench.list_images(droot, "train")
    if count >= len(train):
        raise ValueError(f"{key}: cannot label {count} of {len(train)} train images")
    order = np.random.default_rng(seed).permutation(len(train))
    chosen = sorted(train[i] for i in order[:count])
    header = (
        f"# SEEDED SPLIT of {key} (n={count}, seed={seed}) from `python -m hiervl.data.splits "
        "generate`.\n# NOT the published split: results are not comparable with the literature.\n"
    )
    lines = [
        f"{image} {os.path.relpath(bench.label_file(droot, image), droot)}\n" for image in chosen
    ]
    logger.warning("%s/%d: seeded split (seed %d), NOT the published one", key, count, seed)
    source = {"kind": split_files.SEEDED_KIND, "seed": seed, "count": count}
    return _write(key, count, root, (header + "".join(lines)).encode(), source, f"{key}/{count}")


def summary(root: str) -> List[Tuple[str, int, str, str]]:
    """(dataset, n, kind, unlabelled count or "-") of every split folder present."""
    rows = []
    for key, bench in BENCHMARKS.items():
        for n in bench.label_counts:
            directory = split_files.split_dir(root, key, n)
            if not os.path.isfile(os.path.join(directory, split_files.LABELED_FILE)):
                continue
            unlabeled = os.path.join(directory, split_files.UNLABELED_FILE)
            count = str(len(split_files.read_list(unlabeled))) if os.path.isfile(unlabeled) else "-"
            rows.append((key, n, split_files.read_source(directory).get("kind", "?"), count))
    return rows


def _counts(key: str, wanted: Optional[Sequence[int]]) -> List[int]:
    return list(BENCHMARKS[key].label_counts) if not wanted else list(wanted)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hiervl.data.splits", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sorted(BENCHMARKS)
    p_fetch = sub.add_parser("fetch", help="download the published lists (sha256-checked)")
    p_fetch.add_argument("--datasets", nargs="+", choices=keys, default=keys)
    p_fetch.add_argument("--counts", nargs="+", type=int, help="default: every published count")
    p_fetch.add_argument("--base-url", help="mirror of the repositories' splits/ folder")
    p_fetch.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    p_import = sub.add_parser("import", help="import a local 'image_path label_path' list")
    p_import.add_argument("--dataset", choices=keys, required=True)
    p_import.add_argument("--count", type=int, required=True)
    p_import.add_argument("--file", required=True)
    p_gen = sub.add_parser("generate", help="seeded random lists (NOT the published ones)")
    p_gen.add_argument("--dataset", choices=keys, required=True)
    p_gen.add_argument("--counts", nargs="+", type=int)
    p_gen.add_argument("--seed", type=int, default=0)
    sub.add_parser("list", help="show the split folders present")
    for p in sub.choices.values():
        p.add_argument(
            "--root",
            default=None,
            help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)",
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    root = args.root or default_root()
    if args.command == "fetch":
        for key in args.datasets:
            for n in _counts(key, args.counts):
                fetch(key, n, root, base_url=args.base_url, timeout=args.timeout)
    elif args.command == "import":
        import_list(args.dataset, args.count, root, args.file)
    elif args.command == "generate":
        for n in _counts(args.dataset, args.counts):
            generate(args.dataset, n, root, seed=args.seed)
    else:
        rows = summary(root)
        print(f"{'dataset':<12}{'labelled':>9}  {'kind':<10}{'unlabelled':>11}")
        for key, n, kind, unlabeled in rows:
            print(f"{key:<12}{n:>9}  {kind:<10}{unlabeled:>11}")
        if not rows:
            print(f"(no split lists under {os.path.join(root, 'splits')})")


if __name__ == "__main__":
    main()
