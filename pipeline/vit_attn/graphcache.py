"""What a run needs to know about its model, cached beside the exported graph.

Planning a run needs the token layout, the preprocessing, the weights digest (for the store's
fingerprint) and the ONNX graph. Building the model to learn them costs ~6 s of `import torch`
and timm, so the first run writes them as JSON next to the graph, under a key made of what
determines the graph without building anything: the config's model section (the checkpoint
file by its sha256), the requested outputs, the precision, the versions of torch, timm and
onnx, and the sources of the modules that build the graph. A later run with the same key reads
the record and never imports torch; any change of key (a new checkpoint file under the same
path, another timm) rebuilds the model and exports again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .cachedir import cache_root
from .config import Config
from .filemode import as_if_opened
from .graphinput import PIPELINE_INPUT, GraphInput
from .layout import TokenLayout
from .specs import ModelSource, OutputSpec, checkpoint_file
from .variant import ROWS
from .variant import for_device as attention_for_device

log = logging.getLogger(__name__)

# 2: a digest of the record and the graph's size; 3: the graph's sha256; 4: weights_files
RECORD_VERSION = 4
# A digest is remembered only for a file unchanged this long before it was hashed: a write in
# the same timestamp tick would keep its stat identity. Kernel ticks are a few ms; file
# systems that store whole seconds (ext4 with small inodes, some network ones) need more.
_RACY_SECONDS = 0.1
_RACY_SECONDS_COARSE = 2.5
# The modules whose code decides the exported graph or the facts beside it (preprocessing,
# the outputs a config asks): editing one invalidates every record and graph.
GRAPH_MODULES = (
    "export.py",
    "graphcache.py",
    "decode.py",
    "plan.py",
    "model.py",
    "layout.py",
    "precision.py",
    "stats.py",
    "specs.py",
    "graphinput.py",
    "variant.py",
    "overlay.py",
    "overlay_graph.py",
    "roles.py",
)
# Distributions whose versions change the graph (torch's exporter, timm's model code, onnx).
GRAPH_PACKAGES = ("torch", "timm", "onnx")


@dataclass(frozen=True)
class ModelFacts:
    """Everything planning reads from the model, as plain data.

    Attributes:
        layout: the model's token layout.
        description: the store's `model` attribute (`vit_attn.model.describe`).
        weights_digest: sha256 over every parameter and buffer (`vit_attn.export.weights_digest`).
        preprocess: timm's eval preprocessing for the model (`Preprocess.to_dict()`).
        outputs: the graph's outputs, layers resolved.
        onnx_path: the exported graph, or None when the run does not use onnxruntime.
        cached: whether this came from the cache (no model was built).
        onnx_bytes: the graph file's size when it was exported: a cached graph of another
            size is damaged (truncated, emptied) and is exported again.
        onnx_sha256: the graph file's sha256 when it was recorded: a graph changed in place
            (same size, still parseable, e.g. its weights overwritten) would give wrong maps
            without failing, so it is exported again too.
        weights_files: for pretrained weights, the cached files they came from as they were
            when the graph was made (`hub.files_now`): weights refreshed under the same name
            are built and exported again.
    """

    layout: TokenLayout
    description: dict[str, Any]
    weights_digest: str
    preprocess: dict[str, Any]
    outputs: OutputSpec
    onnx_path: str | None
    cached: bool = False
    onnx_bytes: int | None = None
    onnx_sha256: str | None = None
    weights_files: tuple[dict[str, Any], ...] = ()


def model_source(cfg: Config) -> ModelSource:
    """What to build, from the config's model section."""
    m = cfg.model
    return ModelSource(
        name=m.name,
        pretrained=m.pretrained,
        checkpoint=m.checkpoint,
        seed=m.seed,
        img_size=m.img_size_pair,
        kwargs=dict(m.kwargs),
    )


def package_version(name: str) -> str:
    """An installed distribution's version without importing it (`import torch` takes seconds)."""
    candidates = ("onnxruntime", "onnxruntime-gpu") if name == "onnxruntime" else (name,)
    for candidate in candidates:
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return "absent"


def weights_identity(cfg: Config) -> str:
    """Where the weights come from, as the store's `model.weights` says it: a checkpoint by content."""
    m = cfg.model
    if m.pretrained:
        return "pretrained"
    if m.checkpoint is not None:
        path = checkpoint_file(Path(m.checkpoint))
        return f"checkpoint:{file_sha256(path, cache_root(cfg.inference.cache_dir))}"
    return f"random:{m.seed}"


def file_sha256(path: Path, memo_root: Path | None = None) -> str:
    """The file's sha256, hashed in 1 MiB reads (checkpoints can be GBs).

    With `memo_root`, the digest is remembered under `memo_root/digests/` with the file's
    identity as `stat` gives it (device, inode, size, mtime and ctime in ns), as git's index
    does: a rerun with the same file skips reading it again (a ViT-L checkpoint takes seconds
    to hash), and any write, replacement or move of the file changes its ctime and so hashes
    it again.
    """
    path = Path(path)
    where = str(path.resolve())
    memo = None
    if memo_root is not None:
        st = path.stat()
        ident = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        name = hashlib.sha256(where.encode()).hexdigest()[:32]
        memo = memo_root / "digests" / f"{name}.json"
        try:
            held = json.loads(memo.read_text())
            if held.get("stat") == ident and isinstance(held.get("sha256"), str):
                return str(held["sha256"])
        except (OSError, ValueError, AttributeError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None and time.time() - st.st_ctime_ns / 1e9 > _remember_after(st):
        record = {"path": where, "stat": ident, "sha256": digest}
        try:
            _write_atomically(memo, json.dumps(record))
        except OSError as exc:  # a read-only cache costs time, not correctness
            log.info("cannot remember the digest of %s: %s", path, exc)
    return digest


def _remember_after(st: os.stat_result) -> float:
    """Seconds a file must be unchanged before its digest is remembered: a file changed
    within the timestamp tick of its last change could keep its ctime ("racy git"), and
    whole-second stamps make that tick a second."""
    coarse = st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
    return _RACY_SECONDS_COARSE if coarse else _RACY_SECONDS


def code_digest() -> str:
    """sha256 of the sources of `GRAPH_MODULES`: part of the record's key and the graph's name."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in GRAPH_MODULES:
        path = here / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()


def cache_key(cfg: Config) -> str:
    """Digest of everything that determines the graph and the facts, computed without torch."""
    model = cfg.model.model_dump(mode="json")
    model.pop("checkpoint")  # the file's content counts (in "weights"), not where it lies
    payload = {
        "record": RECORD_VERSION,
        "model": model,
        "weights": weights_identity(cfg),
        "img_size": list(cfg.model.img_size_pair or ()),
        "attention": cfg.attention.model_dump(mode="json"),
        "precision": cfg.inference.precision,
        # A graph takes one input format; a float32 graph must never be fed uint8 pixels.
        "input": PIPELINE_INPUT,
        # Fused attention in uncaptured blocks on CUDA, the plain graph on the CPU (variant.py).
        "attention_variant": attention_for_device(cfg.inference.device),
        # The graph blends the overlays (overlay_graph.py): their settings and matplotlib's
        # colour tables decide it; without overlays nothing of them does.
        "overlays": _overlay_key(cfg),
        # Captured blocks compute only the stored query rows (export.AttentionGraph).
        "capture": ROWS,
        "versions": {name: package_version(name) for name in GRAPH_PACKAGES},
        "vit_attn": __version__,
        "code": code_digest(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _overlay_key(cfg: Config) -> dict[str, Any] | None:
    out = cfg.output
    if out.overlays == "none":
        return None
    return {
        "mode": out.overlays,
        "alpha": out.overlay_alpha,
        "colormap": out.colormap,
        "matplotlib": package_version("matplotlib"),
    }


def record_path(cfg: Config, key: str) -> Path:
    cache = cache_root(cfg.inference.cache_dir)
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.model.name)
    return cache / "onnx" / f"{safe_name}-{cfg.inference.precision}-{key[:20]}.facts.json"


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the frozen dataclasses hold (nested too)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _rebuild(cls: type, data: dict[str, Any]) -> Any:
    """A dataclass from its `asdict` JSON, field by field, so fields added later carry over."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    if set(data) != names:
        raise ValueError(f"{cls.__name__} fields changed: {sorted(set(data) ^ names)}")
    return cls(**{k: _tuples(v) for k, v in data.items()})


def _encode(facts: ModelFacts) -> dict[str, Any]:
    data = {
        "record": RECORD_VERSION,
        "layout": dataclasses.asdict(facts.layout),
        "description": facts.description,
        "weights_digest": facts.weights_digest,
        "preprocess": facts.preprocess,
        "outputs": dataclasses.asdict(facts.outputs),
        "onnx_path": facts.onnx_path,
        "onnx_bytes": facts.onnx_bytes,
        "onnx_sha256": facts.onnx_sha256,
        "weights_files": list(facts.weights_files),
    }
    data["digest"] = _record_digest(data)
    return data


def _record_digest(data: dict[str, Any]) -> str:
    """sha256 of a record's fields: a record edited or damaged in place is not trusted (a
    wrong grid or layer list would make a wrong store, not a failed one)."""
    body = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _decode(data: dict[str, Any]) -> ModelFacts:
    if data.get("record") != RECORD_VERSION:
        raise ValueError(f"record version {data.get('record')}")
    if data.get("digest") != _record_digest(data):
        raise ValueError("its contents do not match its digest (edited or damaged)")
    return ModelFacts(
        layout=_rebuild(TokenLayout, data["layout"]),
        description=dict(data["description"]),
        weights_digest=str(data["weights_digest"]),
        preprocess=dict(data["preprocess"]),
        outputs=_rebuild(OutputSpec, data["outputs"]),
        onnx_path=data["onnx_path"],
        cached=True,
        onnx_bytes=data["onnx_bytes"],
        onnx_sha256=data["onnx_sha256"],
        weights_files=tuple(_tuples(f) for f in data["weights_files"]),
    )


def read_facts(path: Path) -> ModelFacts | None:
    """The cached facts at `path`, or None when absent, unreadable or of another layout."""
    try:
        data = json.loads(path.read_text())
        return _decode(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("ignoring the model record %s (%s); rebuilding it", path, exc)
        return None


def write_facts(path: Path, facts: ModelFacts) -> bool:
    """Keep `facts` at `path` (atomically) if they survive the JSON round trip unchanged."""
    data = _encode(facts)
    text = json.dumps(data, sort_keys=True, indent=1)
    back = _decode(json.loads(text))
    if dataclasses.replace(back, cached=False) != facts:
        # A layout field JSON cannot carry faithfully: build the model each run, never guess.
        log.warning("the model facts do not survive JSON; the fast start is off for this model")
        return False
    try:
        _write_atomically(path, text)
    except OSError as exc:  # a read-only cache costs speed, not correctness
        log.warning("cannot write the model record %s: %s", path, exc)
        return False
    return True


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers
    (other runs sharing the cache) see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    try:
        as_if_opened(tmp)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def resolve(cfg: Config, need_graph: bool | None = None) -> ModelFacts:
    """The model facts of a run: from the cache, or by building (and exporting) the model.

    The graph is exported when `need_graph` (default: when the run uses onnxruntime); a cached
    record whose graph file has gone is rebuilt.
    """
    if need_graph is None:
        need_graph = cfg.inference.backend == "onnxruntime"
    path = record_path(cfg, cache_key(cfg))
    facts = read_facts(path)
    if facts is not None and facts.onnx_path is not None:
        # The graph beside its record, wherever the record says it was made: a cache copied
        # or moved elsewhere uses (and keeps in use) its own graphs, not the old folder's.
        facts = dataclasses.replace(facts, onnx_path=str(path.parent / Path(facts.onnx_path).name))
    memo_root = cache_root(cfg.inference.cache_dir)
    if facts is not None and not _weights_unchanged(facts):
        facts = None
    if facts is not None and (not need_graph or _graph_intact(facts, memo_root)):
        log.info("model record cache hit: %s", path)
        with contextlib.suppress(OSError):  # last use, for `vit-attn cache --prune`
            os.utime(path)
        return facts
    facts = build(cfg, export=need_graph or (facts is not None and facts.onnx_path is not None))
    write_facts(path, facts)
    return facts


def _weights_unchanged(facts: ModelFacts) -> bool:
    """Whether the cached files pretrained weights came from are as when the graph was made
    (always, for a checkpoint or a seed: the cache key holds those)."""
    if not facts.weights_files:
        return True
    from .hub import files_now

    if files_now(facts.weights_files) == facts.weights_files:
        return True
    log.warning(
        "the pretrained weights of %s changed in the local cache since its graph was made; "
        "building and exporting it again",
        facts.description.get("name", "the model"),
    )
    return False


def _graph_intact(facts: ModelFacts, memo_root: Path) -> bool:
    """Whether the record's graph is there as it was exported: same size, same sha256.

    A graph of another size (a truncated copy, a full disk) would fail every batch; one
    changed at the same size (overwritten weights, another export copied over it) would give
    wrong maps. Either is removed, so the rebuild exports it again. The sha256 is read again
    only when the file's `stat` identity changed since it was last hashed (`file_sha256`'s
    memo): any write, copy or move of the graph changes its ctime.
    """
    if facts.onnx_path is None:
        return False
    graph = Path(facts.onnx_path)
    try:
        size = graph.stat().st_size
        if facts.onnx_bytes is not None and size != facts.onnx_bytes:
            why = f"{size} bytes, exported with {facts.onnx_bytes}"
        elif facts.onnx_sha256 is not None and file_sha256(graph, memo_root) != facts.onnx_sha256:
            why = "its content changed since it was exported"
        else:
            return True
    except OSError:
        return False
    log.warning("the cached graph %s is damaged (%s); exporting it again", graph, why)
    with contextlib.suppress(OSError):  # if it stays, the export replaces it or says why not
        graph.unlink()
    return False


def build(cfg: Config, export: bool) -> ModelFacts:
    """Build the model (imports torch and timm) and, with `export`, export its graph."""
    from .decode import preprocess_for_model
    from .export import export_onnx, weights_digest
    from .model import describe, load_model
    from .plan import output_spec

    loaded = load_model(model_source(cfg))
    weights_files: tuple[dict[str, Any], ...] = ()
    if cfg.model.pretrained:
        import torch

        from .hub import files_now, pretrained_files

        found = pretrained_files(getattr(loaded.model, "pretrained_cfg", {}), torch.hub.get_dir())
        weights_files = files_now(found)
    outputs = output_spec(cfg, loaded)
    prep = preprocess_for_model(loaded.model, loaded.layout.input_size)
    onnx_path = None
    if export:
        pixels = GraphInput.pixels(prep.mean, prep.std)
        onnx_path = str(
            export_onnx(
                loaded,
                outputs,
                cfg.inference.precision,
                cfg.inference.cache_dir,
                pixels,
                attention=attention_for_device(cfg.inference.device),
                capture=ROWS,
                # No record vouches for a graph found under the name: another graph may have
                # been copied there. Exporting anew is the one way to be sure of it.
                reuse=False,
            )
        )
    return ModelFacts(
        layout=loaded.layout,
        description=describe(loaded),
        weights_digest=weights_digest(loaded.model),
        preprocess=prep.to_dict(),
        outputs=outputs,
        onnx_path=onnx_path,
        onnx_bytes=Path(onnx_path).stat().st_size if onnx_path is not None else None,
        onnx_sha256=(
            file_sha256(Path(onnx_path), cache_root(cfg.inference.cache_dir))
            if onnx_path is not None
            else None
        ),
        weights_files=weights_files,
    )
