"""Class names as the CLIP text tower sees them, and the check every vocabulary passes.

A class name becomes words for a prompt (:func:`clean_class_name`: "traffic_light" ->
"traffic light"), and CLIP's tokenizer then fixes the text's encoding, collapses whitespace
and lower-cases it. Two names that end up as the same text ("circle" / "Circle ") are one
text query, and two queries for one class would split its pixels arbitrarily: every
vocabulary (dataset classes, a class file, ``TEST.VOCABULARY``, the demo's
``--vocabulary``) goes through :func:`validate_class_names`, which refuses them.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from open_clip.tokenizer import basic_clean, whitespace_clean

__all__ = ["clean_class_name", "query_text", "validate_class_names"]


def clean_class_name(name: str) -> str:
    """Dataset label -> words for a prompt: "traffic_light" -> "traffic light",
    "tv/monitor" -> "tv or monitor", whitespace collapsed."""
    return " ".join(name.replace("_", " ").replace("/", " or ").split())


def query_text(name: str) -> str:
    """The text CLIP's tokenizer encodes for ``name`` (the class's identity as a query)."""
    return whitespace_clean(basic_clean(clean_class_name(name))).lower()


def validate_class_names(names: Sequence[str], source: str) -> Tuple[str, ...]:
    """``names`` unchanged, after checking they make distinct, non-empty text queries.

    Args:
        names: the K class names of a vocabulary.
        source: where they come from, for the error (a file name or a config key).
    Raises:
        ValueError: no names; a name that is not a string or has no words; two names that
            are the same text once normalised (both named, with their positions).
    """
    names = list(names)
    if not names:
        raise ValueError(f"{source}: the vocabulary is empty; give at least one class name")
    seen: dict = {}
    problems: List[str] = []
    for index, name in enumerate(names):
        if not isinstance(name, str) or not query_text(name):
            problems.append(f"class name #{index} {name!r} is not a non-empty string")
            continue
        key = query_text(name)
        if key in seen:
            first = seen[key]
            problems.append(
                f"class names #{first} {names[first]!r} and #{index} {name!r} are the same "
                f"text query {key!r} once CLIP's tokenizer normalises case and whitespace"
            )
        else:
            seen[key] = index
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return tuple(names)
