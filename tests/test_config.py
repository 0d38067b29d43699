"""Every key that ``add_hiervl_config`` adds must be read somewhere in the code."""

import pathlib

from detectron2.config import get_cfg

from hiervl.config import add_hiervl_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CODE_DIRS = ["hiervl", "train_net.py", "demo", "datasets", "benchmarks"]


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _added_keys():
    base = _flatten(get_cfg())
    cfg = add_hiervl_config(get_cfg())
    return sorted(k for k in _flatten(cfg) if k not in base)


def _code_text():
    texts = []
    for entry in CODE_DIRS:
        path = REPO / entry
        files = [path] if path.is_file() else sorted(path.rglob("*.py")) if path.exists() else []
        for f in files:
            if f.name != "config.py" or f.parent.name != "hiervl":
                texts.append(f.read_text())
    return "\n".join(texts)


def test_added_keys_exist():
    keys = _added_keys()
    assert "MODEL.HIERVL.HSQG.RELEVANCE_THRESHOLD" in keys
    assert len(keys) > 50


def test_every_added_key_is_read():
    """A key counts as read when its last two components appear as an attribute access,
    e.g. ``HSQG.RELEVANCE_THRESHOLD`` (``cfg.MODEL.HIERVL.HSQG.RELEVANCE_THRESHOLD``)."""
    code = _code_text()
    unread = [k for k in _added_keys() if ".".join(k.split(".")[-2:]) not in code]
    assert not unread, "config keys read nowhere (remove them or use them):\n" + "\n".join(unread)
