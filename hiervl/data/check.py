"""Check a dataset before training::

    python -m hiervl.data.check --config-file configs/custom/hiervl_custom.yaml \\
        DATASETS.CUSTOM.ROOT /data/mine DATASETS.CUSTOM.CLASSES_FILE /data/mine/classes.txt
    python train_net.py --config-file ... --check-data ...        (the same check)

Every part the config trains and evaluates on (DATASETS.TRAIN_LABELED, TRAIN_UNLABELED,
TEST) is validated as training would (:mod:`hiervl.data.validation`: each image decoded
with its EXIF orientation, each mask checked against it and the class count), and so are
the CLIP weights the model will load. The report gives images per part and their size
range, per-class pixel share and image count of the labelled part, the classes that never
occur in it, the ignore-pixel share and every problem with its file. ``check.png``
(:mod:`hiervl.data.check_sheet`) shows labelled samples with their masks overlaid, val and
unlabelled samples. Exit status 1 when a problem would stop training.
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from hiervl.data.check_sheet import write_check_sheet
from hiervl.data.datasets import custom
from hiervl.data.validation import IGNORE_LABEL, PartReport, Sample, validate_samples
from hiervl.demo.visualizer import DatasetPalette
from hiervl.engine.launcher import setup_cfg
from hiervl.meta_arch import vocabulary_from_cfg
from hiervl.model_builder import check_clip_weights

logger = logging.getLogger("hiervl.data.check")

ROLES = ("labelled", "unlabelled", "evaluation")
CHECK_FILE = "check.png"
_MAX_PRINTED_PROBLEMS = 50
_ERRORS = (ValueError, OSError, KeyError)


@dataclass
class CheckResult:
    """Everything the check found (``problems`` = those that would stop training)."""

    classes: List[str]
    reports: List[Tuple[str, PartReport]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    def parts(self, role: str) -> List[PartReport]:
        return [report for r, report in self.reports if r == role]


def _datasets(cfg) -> List[Tuple[str, str]]:
    """(role, name) of every dataset the config uses, each once."""
    out, seen = [], set()
    lists = (cfg.DATASETS.TRAIN_LABELED, cfg.DATASETS.TRAIN_UNLABELED, cfg.DATASETS.TEST)
    for role, names in zip(ROLES, lists):
        for name in names:
            if name not in seen:
                seen.add(name)
                out.append((role, name))
    return out


def _samples_of(
    name: str, spec: Optional[custom.CustomSpec]
) -> Tuple[str, List[Sample], List[str]]:
    """(source folder, samples, listing problems) of a registered dataset."""
    part = name[len(spec.name) + 1 :] if spec and name.startswith(spec.name + "_") else None
    if spec is not None and part in custom.PARTS:
        samples, problems = custom.list_part(spec, part)
        return custom.folders_of(spec, part).images, samples, problems
    records = DatasetCatalog.get(name)
    samples = [
        Sample(r["file_name"], r.get("sem_seg_file_name"), str(r.get("image_id", "")))
        for r in records
    ]
    folder = MetadataCatalog.get(name).get("image_root", "")
    return folder, samples, [] if samples else [f"dataset {name} has no images"]


def check_part(name: str, role: str, spec: Optional[custom.CustomSpec]) -> PartReport:
    """Validate one registered dataset; problems are collected, never raised."""
    metadata = MetadataCatalog.get(name)
    classes = list(metadata.get("stuff_classes", []) or [])
    source = spec.class_source if spec is not None else f"the class list of {name}"
    try:
        folder, samples, problems = _samples_of(name, spec)
    except _ERRORS as e:
        return PartReport(name, "", role != "unlabelled", problems=[str(e)])
    report = PartReport(name, folder, any(s.mask is not None for s in samples))
    report.problems += problems
    if role != "unlabelled" and samples and not report.labelled:
        report.problems.append(f"dataset {name} is used as {role} data but has no masks")
    if not classes and report.labelled:
        report.problems.append(f"dataset {name} has no stuff_classes metadata")
        return report
    report.results = validate_samples(
        samples,
        num_classes=len(classes),
        class_source=source,
        ignore_label=metadata.get("ignore_label", IGNORE_LABEL),
        desc=f"checking {name}",
    )
    report.problems += [p for r in report.results for p in r.problems]
    if role == "unlabelled" and report.labelled:
        # Not an error: the unlabelled stream never opens a mask (mappers.py).
        report.labelled = False
    return report


def _note_overlap(result: CheckResult) -> None:
    """Images named alike in the labelled and unlabelled parts (e.g. pseudo-labelled
    photos copied to the labelled part but left in the unlabelled one): a note, since
    training on them twice is allowed."""
    labelled = {r.sample.id for p in result.parts("labelled") for r in p.results}
    both = sorted({r.sample.id for p in result.parts("unlabelled") for r in p.results} & labelled)
    if both:
        shown = ", ".join(both[:5]) + (", ..." if len(both) > 5 else "")
        result.notes.append(
            f"{len(both)} images have the same name in the labelled and the unlabelled "
            f"part ({shown}): remove them from the unlabelled part if they are the same photos"
        )


def run_check(cfg) -> CheckResult:
    """The whole check of a (frozen, datasets registered) config."""
    try:
        classes = vocabulary_from_cfg(cfg)
    except ValueError as e:
        return CheckResult(classes=[], problems=[str(e)])
    result = CheckResult(classes=classes)
    spec = custom.spec_from_cfg(cfg)
    if spec is not None and not custom.has_val(spec):
        result.notes.append(
            f"custom dataset {spec.name!r} has no val part: training runs without periodic "
            f"evaluation (add {spec.val.images_key} / {spec.val.masks_key} folders to get it)"
        )
    if not cfg.DATASETS.TRAIN_LABELED:
        result.problems.append("DATASETS.TRAIN_LABELED is empty: nothing to train on")
    for role, name in _datasets(cfg):
        report = check_part(name, role, spec)
        result.reports.append((role, report))
        result.problems += report.problems
    _note_overlap(result)
    if cfg.MODEL.META_ARCHITECTURE == "HierVL":
        try:
            check_clip_weights(cfg)
        except ValueError as e:
            result.problems.append(str(e))
    # A file shared by two parts (single_folder: train and train_labeled) is listed once.
    result.problems = list(dict.fromkeys(result.problems))
    return result


def _size_range(report: PartReport) -> str:
    sizes = report.sizes()
    if not sizes:
        return "-"
    heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
    h = f"{min(heights)}" if min(heights) == max(heights) else f"{min(heights)}-{max(heights)}"
    w = f"{min(widths)}" if min(widths) == max(widths) else f"{min(widths)}-{max(widths)}"
    return f"{h} x {w}"


def _class_table(result: CheckResult, lines: List[str]) -> None:
    labelled = result.parts("labelled")
    k = len(result.classes)
    if not labelled or not k:
        return
    pixels = sum(r.pixel_counts(k) for r in labelled)
    images = sum(r.image_counts(k) for r in labelled)
    total = max(int(pixels.sum()), 1)
    count = sum(len(r.sizes()) for r in labelled)
    width = max(12, *(len(n) for n in result.classes))
    lines += ["", f"labelled part ({count} images, {int(pixels.sum())} pixels):"]
    lines.append(f"  {'#':>3}  {'class':<{width}}  {'pixels':>7}  {'images':>6}")
    for index, name in enumerate(result.classes):
        share = 100.0 * pixels[index] / total
        lines.append(f"  {index:>3}  {name:<{width}}  {share:6.2f}%  {int(images[index]):>6}")
    lines.append(f"  {'':>3}  {'ignore (255)':<{width}}  {100.0 * pixels[k] / total:6.2f}%")
    never = [n for i, n in enumerate(result.classes) if images[i] == 0]
    lines.append(f"classes never in the labelled part: {', '.join(never) if never else 'none'}")


def format_report(result: CheckResult, title: str) -> str:
    """The printed summary table."""
    lines = [title]
    if result.classes:
        lines.append(f"{len(result.classes)} classes: {', '.join(result.classes)}")
    if result.reports:
        width = max(7, *(len(report.name) for _, report in result.reports))
        lines += [
            "",
            f"{'role':<10}  {'dataset':<{width}}  {'images':>6}  {'size (h x w)':<17}  folder",
        ]
        for role, report in result.reports:
            lines.append(
                f"{role:<10}  {report.name:<{width}}  {len(report.sizes()):>6}  "
                f"{_size_range(report):<17}  {report.source or '-'}"
            )
    _class_table(result, lines)
    lines += [f"note: {note}" for note in result.notes]
    if result.problems:
        lines += ["", f"PROBLEMS ({len(result.problems)}), training would stop:"]
        lines += [f"  {p}" for p in result.problems[:_MAX_PRINTED_PROBLEMS]]
        if len(result.problems) > _MAX_PRINTED_PROBLEMS:
            lines.append(f"  ... and {len(result.problems) - _MAX_PRINTED_PROBLEMS} more")
    else:
        lines += ["", "problems: none"]
    return "\n".join(lines)


def check_and_report(config_file: str, opts: Sequence[str], output: Optional[str]) -> int:
    """Run the check of ``config_file`` + ``opts``, print the report, write the picture
    (``output``, default ``OUTPUT_DIR/check.png``); returns the exit status."""
    try:
        cfg = setup_cfg(config_file, list(opts))
    except (ValueError, OSError) as e:
        print(f"dataset check: {e}")
        return 1
    result = run_check(cfg)
    report = format_report(result, f"HierVL dataset check of {config_file}")
    picture = output or os.path.join(cfg.OUTPUT_DIR, CHECK_FILE)
    written = None
    if result.reports:
        palette = DatasetPalette.from_metadata(MetadataCatalog.get(result.reports[0][1].name))
        written = write_check_sheet(result, picture, palette)
    print(report)
    print(f"check.png: {written}" if written else "check.png: nothing to draw")
    return 1 if result.problems else 0


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--output", metavar="FILE", help=f"picture to write (default OUTPUT_DIR/{CHECK_FILE})"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="hiervl")
    return check_and_report(args.config_file, args.opts, args.output)


if __name__ == "__main__":
    sys.exit(main())
