"""Can the weights of an open_clip pretrained tag be had here, before anything is built?

open_clip downloads a tag's weights on first use (from the Hugging Face Hub when
``huggingface_hub`` is installed, else from a URL) into a local cache. On a machine
without internet that fails deep inside the model build, after retries, in a long log.
:func:`require_tag_weights` runs first: when the file is not cached and the download host
does not answer a TCP connection within a few seconds, it raises a one-line ValueError
saying how to use a local checkpoint or a small CPU config instead.
"""

from __future__ import annotations

import os
import socket
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

import open_clip

__all__ = ["cached_weights", "check_weights_source", "host_reachable", "require_tag_weights"]

PROBE_TIMEOUT_S = 3.0
# The config that trains on a CPU without pretrained weights (GETTING_STARTED.md).
SMALL_CPU_CONFIG = "configs/custom/hiervl_custom_tiny.yaml"
_HF_WEIGHTS = "open_clip_pytorch_model.bin"
_HF_SAFE_WEIGHTS = "open_clip_model.safetensors"
_URL_CACHE = os.path.join("~", ".cache", "clip")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_TRUE = ("1", "true", "yes", "on")


def _hub() -> Optional[object]:
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def _hf_files(hf_hub: str) -> Tuple[str, List[str]]:
    """open_clip's ``org/name/[file]`` entry -> (repo id, files it tries, in order)."""
    repo_id, filename = os.path.split(hf_hub)
    if not filename or filename == _HF_WEIGHTS:
        return repo_id, [_HF_SAFE_WEIGHTS, _HF_WEIGHTS]
    return repo_id, [filename]


def _source(tag_cfg: Dict) -> Tuple[str, str]:
    """("hf", "org/name/[file]") or ("url", url): where open_clip will fetch from."""
    if tag_cfg.get("hf_hub") and _hub() is not None:
        return "hf", tag_cfg["hf_hub"]
    return "url", tag_cfg.get("url", "")


def cached_weights(tag_cfg: Dict) -> Optional[str]:
    """The locally cached weight file open_clip would use for this tag, or None."""
    if "file" in tag_cfg:
        return tag_cfg["file"]
    kind, where = _source(tag_cfg)
    if kind == "hf":
        repo_id, names = _hf_files(where)
        for name in names:
            path = _hub().try_to_load_from_cache(repo_id, name)
            if isinstance(path, str) and os.path.isfile(path):
                return path
        return None
    path = os.path.join(os.path.expanduser(_URL_CACHE), os.path.basename(where))
    return path if where and os.path.isfile(path) else None


def _endpoint(tag_cfg: Dict) -> str:
    kind, where = _source(tag_cfg)
    if kind == "hf":
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return where


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or the HTTPS proxy) opens in time."""
    proxy = next((os.environ[v] for v in _PROXY_VARIABLES if os.environ.get(v)), "")
    target = urlparse(proxy if proxy else url)
    if not target.hostname:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline(kind: str) -> bool:
    return kind == "hf" and os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def require_tag_weights(model_name: str, tag: str, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise a one-line ValueError when the weights of open_clip tag ``tag`` of
    ``model_name`` are neither cached nor downloadable from here; else return."""
    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not tag_cfg or cached_weights(tag_cfg):
        return
    kind, where = _source(tag_cfg)
    endpoint = _endpoint(tag_cfg)
    if not _offline(kind) and host_reachable(endpoint, timeout):
        return
    page = f"https://huggingface.co/{_hf_files(where)[0]}" if kind == "hf" else where
    architecture = f"{model_name}-quickgelu" if tag_cfg.get("quick_gelu") else model_name
    raise ValueError(
        f"MODEL.HIERVL.CLIP.PRETRAINED {tag!r} needs the {model_name} weights, which are not "
        f"in the local cache, and {urlparse(endpoint).hostname or endpoint} cannot be reached "
        "from this machine (offline?): download them elsewhere "
        f"({page}) and pass MODEL.HIERVL.CLIP.MODEL_NAME {architecture} "
        "MODEL.HIERVL.CLIP.PRETRAINED /path/to/the/checkpoint, or train the small CPU config "
        f"--config-file {SMALL_CPU_CONFIG} (random-init CLIP, no download)"
    )


def check_weights_source(model_name: str, pretrained: Optional[str]) -> None:
    """What :func:`~hiervl.modeling.backbone.clip_loader.build_clip` will need, checked
    without building anything: a tag's weights (:func:`require_tag_weights`) or the
    checkpoint file. Raises a one-line ValueError."""
    pretrained = (pretrained or "").strip()
    if not pretrained or model_name.startswith(("hf-hub:", "local-dir:")):
        return
    if model_name != "custom" and open_clip.get_pretrained_cfg(model_name, pretrained):
        require_tag_weights(model_name, pretrained)
    elif not os.path.isfile(os.path.expanduser(pretrained)):
        raise ValueError(
            f"MODEL.HIERVL.CLIP.PRETRAINED {pretrained!r} is neither an open_clip tag of "
            f"{model_name!r} nor an existing checkpoint file"
        )
