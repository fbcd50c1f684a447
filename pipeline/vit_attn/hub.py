"""Pretrained weights: no waiting on a hub that cannot be reached, and the cached files they
came from, so that a graph made from them is not reused once those files change.

huggingface_hub retries each request five times with growing pauses, and timm asks for two
files, so an offline machine waited ~50 s before it learnt that the weights were not in its
cache. One short connection to the hub's endpoint first tells which case it is; an
unreachable hub turns on the hub's own offline mode for the load, so weights already in the
cache load at once and missing ones fail at once.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .remote import unreachable_host

# How long the one connection to the hub may take before it counts as unreachable.
PROBE_SECONDS = 5.0


def unreachable(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why `endpoint`'s host cannot be connected to (name lookup or TCP), or None.

    None as well where a proxy is configured for its scheme: the proxy decides what is
    reachable, and only the real request through it can tell."""
    parts = urlsplit(endpoint)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        return None
    proxies = urllib.request.getproxies()
    if (parts.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(
        parts.hostname
    ):
        return None
    return unreachable_host(endpoint, timeout)


@contextlib.contextmanager
def offline_if_unreachable() -> Iterator[str | None]:
    """Within: the hub's offline mode if its endpoint cannot be reached. Yields the reason
    it could not (None when it can, or offline mode was on already)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield None
        return
    why = unreachable(constants.ENDPOINT)
    if why is None:
        yield None
        return
    constants.HF_HUB_OFFLINE = True  # what every request of the hub reads when it is made
    try:
        yield f"{constants.ENDPOINT} unreachable: {why}"
    finally:
        constants.HF_HUB_OFFLINE = False


# The files of a timm hub repo that pretrained weights are read from, in timm's preference.
_HUB_WEIGHT_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)


def pretrained_files(pretrained_cfg: Mapping[str, Any], torch_hub_dir: str) -> list[dict[str, Any]]:
    """What pretrained weights were read from, as the local caches hold it now.

    A graph exported from them is reused by the model's name; these entries tell whether the
    weights under that name are still the same files (a Hugging Face cache refreshed under
    the same tag, a re-downloaded URL). For a hub repo: every weights file timm may read
    there (a safetensors file appearing beside a .bin changes what timm loads); for a URL
    or a file: that file. `torch_hub_dir`: `torch.hub.get_dir()`, where URLs are saved."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = str(hub_id).partition("@")
        names = set(_HUB_WEIGHT_FILES)
        if pretrained_cfg.get("hf_hub_filename"):
            names.add(str(pretrained_cfg["hf_hub_filename"]))
        return [
            {"repo": repo, "revision": revision or None, "file": name} for name in sorted(names)
        ]
    url, file = pretrained_cfg.get("url"), pretrained_cfg.get("file")
    if file:
        return [{"path": os.path.abspath(str(file))}]
    if url:
        name = os.path.basename(urlsplit(str(url)).path)
        return [{"path": os.path.join(torch_hub_dir, "checkpoints", name)}]
    return []


def files_now(entries: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    """`entries` (`pretrained_files`) with what each file is now: its stored blob or path,
    size and time; None for one that is not there. Needs huggingface_hub, not torch."""
    out = []
    for entry in entries:
        where: str | None
        if "repo" in entry:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(
                entry["repo"], entry["file"], revision=entry.get("revision")
            )
            where = os.path.realpath(found) if isinstance(found, str) else None
        else:
            where = str(entry["path"])
        try:
            st = os.stat(where) if where is not None else None
        except OSError:
            st = None
        now = {k: entry[k] for k in ("repo", "revision", "file", "path") if k in entry}
        now["found"] = None if st is None else (where, st.st_size, st.st_mtime_ns)
        out.append(now)
    return tuple(out)
