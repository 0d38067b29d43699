"""Two-stream semi-supervised training loader and the evaluation loader.

Every iteration yields one named batch for this process::

    {"labeled":       [LabeledMapper outputs]   (IMS_PER_BATCH_LABELED / world size),
     "unlabeled":     [UnlabeledMapper outputs] (IMS_PER_BATCH_UNLABELED / world size),
     "unlabeled_mix": [UnlabeledMapper outputs] (same size: the CutMix partners),
     "iteration":     int}

Three independent infinite streams (labelled, unlabelled, partner) each walk their own
seeded permutations of their dataset, epoch after epoch. Stream position p (counted over
all processes) maps to epoch p // N and slot p % N of that epoch's permutation, and its
augmentation generator is seeded from (seed, stream, p). Iteration t of the global batch
covers positions [t·T, (t+1)·T) (T = total batch); rank r takes the r-th contiguous
chunk, so ranks see disjoint samples of the same permutation and the global batch is the
same for any world size. Nothing depends on the worker count, and resuming at
``start_iter`` jumps straight to its positions without touching earlier samples.

Workers parallelise over iterations (one worker builds a whole iteration); the DataLoader
returns them in order.
"""

import itertools
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data as torchdata
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from hiervl.data.mappers import InferenceMapper, LabeledMapper, UnlabeledMapper

logger = logging.getLogger(__name__)

# Stream ids: part of every seed, so the three streams are independent.
STREAM_IDS = {"labeled": 0, "unlabeled": 1, "unlabeled_mix": 2}
# Second seed word: which generator of a stream (its epoch permutations or a sample's
# augmentation); keeps the two families of generators from ever sharing a seed.
_PERMUTATION, _AUGMENTATION = 0, 1


def _per_rank_batch(key: str, total: int, world_size: int, minimum: int) -> int:
    if total < minimum or total % world_size != 0:
        raise ValueError(
            f"{key} = {total} is the total batch over all processes and must be >= {minimum} "
            f"and divisible by the world size {world_size}"
        )
    return total // world_size


class _Stream:
    """An infinite seeded stream of mapped samples over one list of dataset dicts."""

    def __init__(
        self,
        *,
        name: str,
        dicts: Sequence[Dict[str, Any]],
        mapper: Callable[..., Dict[str, Any]],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
    ):
        assert name in STREAM_IDS, f"unknown stream {name}"
        assert 0 <= rank < world_size, f"rank {rank} outside world size {world_size}"
        self.name = name
        self.dicts = DatasetFromList(list(dicts), copy=False, serialize=True)
        self.mapper = mapper
        self.batch_size = batch_size
        self.total_batch_size = batch_size * world_size
        self.rank = rank
        self.seed_words = (int(seed), STREAM_IDS[name])
        self._permutations: Dict[int, np.ndarray] = {}

    def positions(self, iteration: int) -> range:
        """Stream positions of this rank's share of the iteration's global batch."""
        start = iteration * self.total_batch_size + self.rank * self.batch_size
        return range(start, start + self.batch_size)

    def index_at(self, position: int) -> int:
        """Dataset index at a stream position (its epoch's seeded permutation)."""
        epoch, slot = divmod(position, len(self.dicts))
        if epoch not in self._permutations:
            # Positions arrive (nearly) in order: only recent epochs are asked for again.
            self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            rng = np.random.default_rng([*self.seed_words, _PERMUTATION, epoch])
            self._permutations[epoch] = rng.permutation(len(self.dicts))
        return int(self._permutations[epoch][slot])

    def sample(self, position: int) -> Dict[str, Any]:
        rng = np.random.default_rng([*self.seed_words, _AUGMENTATION, position])
        return self.mapper(self.dicts[self.index_at(position)], rng)

    def batch(self, iteration: int) -> List[Dict[str, Any]]:
        return [self.sample(p) for p in self.positions(iteration)]


class _IterationDataset(torchdata.Dataset):
    """Map-style dataset whose item t is the whole named batch of iteration t."""

    def __init__(self, streams: Dict[str, Optional[_Stream]]):
        self.streams = streams

    def __getitem__(self, iteration: int) -> Dict[str, Any]:
        batch: Dict[str, Any] = {
            name: [] if stream is None else stream.batch(iteration)
            for name, stream in self.streams.items()
        }
        batch["iteration"] = iteration
        return batch


class _CountFrom(torchdata.Sampler):
    """Infinite sampler start, start+1, ... (the iteration numbers)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class TwoStreamLoader:
    """Iterable over named two-stream batches, starting at ``start_iter``.

    ``start_iter`` may be changed before iterating (e.g. by the trainer after
    ``resume_or_load``); each ``iter()`` starts a fresh DataLoader there.
    """

    def __init__(
        self,
        *,
        labeled_dicts: Sequence[Dict[str, Any]],
        unlabeled_dicts: Optional[Sequence[Dict[str, Any]]],
        labeled_mapper: Callable[..., Dict[str, Any]],
        unlabeled_mapper: Optional[Callable[..., Dict[str, Any]]],
        labeled_batch_size: int,
        unlabeled_batch_size: int,
        seed: int,
        num_workers: int,
        start_iter: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        """
        Args:
            labeled_dicts / unlabeled_dicts: detectron2 dataset dicts; unlabelled dicts may
                be None (supervised-only training: the unlabelled lists stay empty).
            labeled_batch_size / unlabeled_batch_size: TOTAL over all processes.
            seed: non-negative; fixes the permutations and every augmentation.
        """
        if not labeled_dicts:
            raise ValueError("the labelled training set is empty")
        if seed < 0:
            raise ValueError(f"the loader seed must be >= 0, got {seed}")
        labeled_per_rank = _per_rank_batch(
            "SOLVER.IMS_PER_BATCH_LABELED", labeled_batch_size, world_size, minimum=1
        )
        common = {"seed": seed, "rank": rank, "world_size": world_size}
        streams: Dict[str, Optional[_Stream]] = {
            "labeled": _Stream(
                name="labeled",
                dicts=labeled_dicts,
                mapper=labeled_mapper,
                batch_size=labeled_per_rank,
                **common,
            ),
            "unlabeled": None,
            "unlabeled_mix": None,
        }
        if unlabeled_dicts is not None:
            if not unlabeled_dicts:
                raise ValueError("the unlabelled training set is empty")
            assert unlabeled_mapper is not None, "unlabelled dicts given without a mapper"
            unlabeled_per_rank = _per_rank_batch(
                "SOLVER.IMS_PER_BATCH_UNLABELED", unlabeled_batch_size, world_size, minimum=0
            )
            for name in ("unlabeled", "unlabeled_mix"):
                streams[name] = _Stream(
                    name=name,
                    dicts=unlabeled_dicts,
                    mapper=unlabeled_mapper,
                    batch_size=unlabeled_per_rank,
                    **common,
                )
        self.dataset = _IterationDataset(streams)
        self.num_workers = int(num_workers)
        self.start_iter = int(start_iter)

    def __iter__(self):
        loader = torchdata.DataLoader(
            self.dataset,
            batch_size=None,
            sampler=_CountFrom(self.start_iter),
            num_workers=self.num_workers,
        )
        return iter(loader)


def _dataset_names(key: str, value) -> Tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names:
        raise ValueError(f"{key} is empty; name at least one registered dataset")
    return names


def load_dataset_dicts(key: str, value) -> List[Dict[str, Any]]:
    """Concatenated dicts of the registered datasets named by config key ``key``."""
    dicts: List[Dict[str, Any]] = []
    registered = DatasetCatalog.list()
    for name in _dataset_names(key, value):
        if name not in registered:
            raise ValueError(
                f"{key} names {name!r}, which is not a registered dataset (did you call "
                "hiervl.data.datasets.register_all()?); registered: " + ", ".join(registered)
            )
        part = DatasetCatalog.get(name)
        if len(part) == 0:
            raise ValueError(f"{key} names {name!r}, which has no images")
        dicts.extend(part)
    return dicts


def _check_labeled(dicts: Sequence[Dict[str, Any]], value) -> None:
    for d in dicts:
        if "sem_seg_file_name" not in d:
            raise ValueError(
                f"DATASETS.TRAIN_LABELED = {value}: image {d.get('file_name')} has no "
                "'sem_seg_file_name' (is an unlabelled set listed as labelled?)"
            )


def _strip_labels(dicts: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Unlabelled dicts without any label path, so none can reach the unlabelled stream."""
    stripped = [{k: v for k, v in d.items() if k != "sem_seg_file_name"} for d in dicts]
    dropped = sum(len(d) != len(s) for d, s in zip(dicts, stripped))
    if dropped:
        logger.info("Dropped the labels of %d images used as unlabelled data.", dropped)
    return stripped


def build_two_stream_train_loader(
    cfg,
    start_iter: int = 0,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> TwoStreamLoader:
    """The training loader from a config (see the module docstring for the batch).

    Reads DATASETS.TRAIN_LABELED / TRAIN_UNLABELED, SOLVER.IMS_PER_BATCH_LABELED /
    IMS_PER_BATCH_UNLABELED (totals over processes), DATALOADER.NUM_WORKERS, SEED and
    MODEL.HIERVL.SSL.ENABLED (False: no unlabelled streams, their lists are empty).
    ``rank``/``world_size`` default to the torch.distributed ones.
    """
    rank = comm.get_rank() if rank is None else rank
    world_size = comm.get_world_size() if world_size is None else world_size
    seed = cfg.SEED
    if seed < 0:
        seed = comm.shared_random_seed()
        logger.warning(
            "SEED < 0: the data order uses the random seed %d; set SEED for a run whose "
            "--resume reproduces the data order.",
            seed,
        )
    labeled = load_dataset_dicts("DATASETS.TRAIN_LABELED", cfg.DATASETS.TRAIN_LABELED)
    _check_labeled(labeled, cfg.DATASETS.TRAIN_LABELED)
    unlabeled = None
    if cfg.MODEL.HIERVL.SSL.ENABLED:
        unlabeled = _strip_labels(
            load_dataset_dicts("DATASETS.TRAIN_UNLABELED", cfg.DATASETS.TRAIN_UNLABELED)
        )
        overlap = {d["file_name"] for d in labeled} & {d["file_name"] for d in unlabeled}
        if overlap:
            logger.warning(
                "%d images are both labelled and unlabelled (e.g. %s).",
                len(overlap),
                sorted(overlap)[0],
            )
    logger.info(
        "Two-stream loader: %d labelled, %s unlabelled images; seed %d; start iteration %d.",
        len(labeled),
        "no" if unlabeled is None else len(unlabeled),
        seed,
        start_iter,
    )
    return TwoStreamLoader(
        labeled_dicts=labeled,
        unlabeled_dicts=unlabeled,
        labeled_mapper=LabeledMapper(cfg, is_train=True),
        unlabeled_mapper=None if unlabeled is None else UnlabeledMapper(cfg, is_train=True),
        labeled_batch_size=cfg.SOLVER.IMS_PER_BATCH_LABELED,
        unlabeled_batch_size=cfg.SOLVER.IMS_PER_BATCH_UNLABELED,
        seed=seed,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        start_iter=start_iter,
        rank=rank,
        world_size=world_size,
    )


def build_test_loader(cfg, dataset_name: str) -> torchdata.DataLoader:
    """Evaluation loader (batch 1, images at their own size, sharded over processes by
    detectron2's InferenceSampler) over one registered dataset."""
    dicts = load_dataset_dicts("the evaluation dataset (DATASETS.TEST)", dataset_name)
    return build_detection_test_loader(
        dicts, mapper=InferenceMapper(cfg, is_train=False), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
