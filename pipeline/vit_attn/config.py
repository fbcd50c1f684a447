"""The YAML config: validated pydantic models, `--set` overrides, and path resolution.

Unknown keys and wrong types are errors that name the key and the file, so a typo never
silently falls back to a default on a cluster job.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import reprlib
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, PipelineError
from .specs import check_layer_selection, check_weight_source

# Error messages show values through this: a huge or alias-expanded value stays one short line.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 3, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40
# A config has a few hundred values; YAML aliases can expand a small file to billions.
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_CHARS = 256 * 1024
MAX_CONFIG_DEPTH = 32  # sections, then model.kwargs and the like: a few levels in practice
# inference.threads beyond this is a typo: 100000 hung a run spawning threads for minutes.
MAX_THREADS = 1024
# Counts of processes, jobs and retries beyond these are typos too: cluster.n_workers 100000
# hung a run building worker processes, past Ctrl-C and SIGTERM (held during the start).
MAX_WORKERS = 1024
MAX_JOBS = 100_000
# A Dask scheduler address: scheme://host:port, or host:port (tcp is implied).
_ADDRESS = re.compile(r"^(?:[a-z][a-z0-9+.-]*://\S+|[^\s:/]+:\d+|\[[0-9a-fA-F:]+\]:\d+)$")


def _short(value: Any) -> str:
    return _REPR.repr(value)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice (YAML would keep the last silently)."""


class _StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key given twice in one mapping.

    Plain YAML keeps the last value: a second `attention:` section pasted at the end of a
    config would silently drop every key of the first. Keys merged in with `<<: *anchor` may
    still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                where = f"lines {first} and {line}" if first != line else f"line {line}"
                raise DuplicateKeyError(f"key {_short(key)} is given twice ({where}); keep one")
        return super().construct_mapping(node, deep=deep)


class NestingError(yaml.YAMLError):
    """YAML nested deeper than the parser's recursion allows (`[[[[...]]]]`)."""


def load_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, but a key given twice in a mapping is an error."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise NestingError(f"nested more than {MAX_CONFIG_DEPTH} levels") from None


def _check_size(data: Any, origin: str) -> None:
    """Refuse a config that expands (through YAML aliases) to more values than any real one,
    or nests deeper (`--set a.a.a...=1` or `[[[...]]]`: later steps recurse on it)."""
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{origin}: the config expands to more than {MAX_CONFIG_VALUES:,} values "
                "(nested YAML aliases?); write the values out"
            )
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"{origin}: values nested more than {MAX_CONFIG_DEPTH} levels; no config "
                "needs that many"
            )
        if isinstance(node, dict):
            stack.extend((k, depth + 1) for k in node.keys())
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)


def _refuse_half_url(text: str) -> None:
    """`s3:/bucket/x` would silently be a local folder named `s3:` (`remote.half_url`)."""
    from .remote import half_url

    if half_url(text):
        raise ValueError(f"{_short(text)} looks like a URL missing a slash (s3://bucket/...)")


def _takes_int_not_bool(annotation: Any) -> bool:
    found: set[Any] = set()

    def walk(a: Any) -> None:
        found.add(a)
        for arg in typing.get_args(a):
            walk(arg)

    walk(annotation)
    return int in found and bool not in found


def _takes_path(annotation: Any) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)


def _not_an_int(value: Any) -> bool:
    """A boolean or a float where integers go (a list: any of its items)."""
    if isinstance(value, list | tuple):
        return any(_not_an_int(v) for v in value)
    return isinstance(value, bool | float)


def _has_bool_item(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return any(_has_bool_item(v) for v in value)
    return isinstance(value, bool)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _only_ints_for_int(cls, data: Any) -> Any:
        """YAML `true` must not become block 1 or batch size 1, nor `1.0` block 1: pydantic's
        lax int takes bools and whole floats, which are never what a count or index meant."""
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                value = data.get(name)
                if name in data and _takes_int_not_bool(info.annotation) and _not_an_int(value):
                    got = "a boolean" if _has_bool_item(value) else "a number with a point"
                    raise ValueError(f"{name}: expected integers, got {got} ({_short(value)})")
                if _takes_path(info.annotation) and isinstance(value, str) and not value.strip():
                    # Path("") is "." : the config's own folder, silently
                    raise ValueError(f"{name}: is empty; give a path, or leave the key out")
        return data


class ModelConfig(_Section):
    name: str
    pretrained: bool = False
    checkpoint: Path | None = None
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1, description="torch.manual_seed's range")
    img_size: int | tuple[int, int] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_weight_source(self) -> ModelConfig:
        check_weight_source(self.pretrained, self.checkpoint, self.kwargs)
        if self.img_size is not None and "img_size" in self.kwargs:
            # model.img_size wins, and the store recorded the other in model.kwargs
            raise ValueError(
                "img_size is given twice (model.img_size and model.kwargs.img_size); keep "
                "model.img_size"
            )
        return self

    @property
    def img_size_pair(self) -> tuple[int, int] | None:
        if self.img_size is None:
            return None
        if isinstance(self.img_size, int):
            return (self.img_size, self.img_size)
        return tuple(self.img_size)  # type: ignore[return-value]


class DataConfig(_Section):
    source: str
    decode_threads: int = Field(1, ge=1, le=64)
    # fsspec options for a URL source (endpoint_url, anon, key, ...); see vit_attn.remote.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    image_column: str | None = None  # Parquet: the image bytes column (default "image")
    id_column: str | None = None  # Parquet: the column image_path is taken from
    label_key: str | None = None  # WebDataset member extension / Parquet column -> `label`
    verify: Literal["stat", "hash"] = Field(
        "stat", description="how a resume recognises changed images: size+mtime, or + sha256"
    )

    @field_validator("source")
    @classmethod
    def _not_half_a_url(cls, v: str) -> str:
        if not v.strip():  # resolved against the config's folder, it would list that folder
            raise ValueError("is empty; give a folder, a glob, a list file or a URL")
        _refuse_half_url(v)
        return v


class AttentionConfig(_Section):
    layers: Literal["all"] | int | list[int] = Field(default_factory=lambda: [-1])

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_selection(cls, v: Any) -> Any:
        """One line on what layers takes (pydantic's union would say "Input should be 'all'")."""
        try:
            check_layer_selection(v)
        except PipelineError as exc:
            raise ValueError(str(exc).removeprefix("attention.layers: ")) from None
        return v

    full: bool = False
    rollout: bool = False
    stats: bool = (
        False  # per-(image, layer, head) statistics computed in the graph (vit_attn.stats)
    )
    topk: int = Field(5, ge=0, le=100)


class InferenceConfig(_Section):
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "mixed"] = "fp32"
    batch_size: int = Field(32, ge=1, le=4096)
    threads: int = Field(
        0,
        ge=0,
        le=MAX_THREADS,
        description="threads per inference session; 0 = the worker's share of cores",
    )
    allow_cpu_fallback: bool = False
    tensorrt: bool = False
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _mixed_torch_on_cuda_only(self) -> InferenceConfig:
        # The torch backend's mixed precision is CUDA autocast; on the CPU it ran fp32 while
        # the store said "mixed".
        if self.backend == "torch" and self.precision == "mixed" and self.device == "cpu":
            raise ValueError(
                "precision 'mixed' with backend 'torch' needs device 'cuda' (CUDA autocast); "
                "on the CPU use backend 'onnxruntime' (its mixed graph runs there) or "
                "precision 'fp32'"
            )
        return self


class OutputConfig(_Section):
    store: Path | str  # a URL (s3://bucket/run.zarr) stays a string: see _store_location
    storage_options: dict[str, Any] = Field(default_factory=dict)
    overlays: Literal["none", "mean", "heads"] = "mean"
    overlay_alpha: float = Field(0.5, ge=0.0, le=1.0)
    colormap: str = "inferno"
    png_dir: Path | None = None
    png_heads: bool = False
    compression: Literal["default", "none", "zstd", "lz4"] = "default"
    # float32 keeps the graph's values exactly (float16 rounds them, ~5e-4 relative, and
    # flushes probabilities below ~6e-8 to 0) for twice the bytes.
    attention_dtype: Literal["float16", "float32"] = "float16"
    overwrite: bool = False
    lock_stale_seconds: float = Field(
        120.0,
        ge=1.0,
        le=7 * 24 * 3600.0,
        description="a store lock without heartbeat for this long is taken over (at most a week)",
    )

    @field_validator("store", mode="before")
    @classmethod
    def _store_location(cls, v: Any) -> Any:
        from .remote import location

        if isinstance(v, str):
            _refuse_half_url(v)
        return location(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _options_for_urls_only(self) -> OutputConfig:
        from .remote import is_url

        if self.storage_options and not is_url(str(self.store)):
            raise ValueError(
                f"storage_options: store {_short(str(self.store))} is a local path; options "
                "apply to URLs only"
            )
        return self


class SlurmConfig(_Section):
    queue: str | None = None
    account: str | None = None
    cores: int = Field(4, ge=1, le=MAX_THREADS)
    processes: int = Field(1, ge=1, le=MAX_WORKERS)
    memory: str = "16GB"
    walltime: str = "01:00:00"
    gpus: int = Field(0, ge=0, le=64)
    jobs: int = Field(1, ge=1, le=MAX_JOBS, description="jobs to start; with `adapt`, the maximum")
    adapt: bool = False
    minimum_jobs: int = Field(0, ge=0, le=MAX_JOBS)
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    worker_lifetime: str | None = None
    worker_lifetime_stagger: str = "5m"
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    python: str | None = None


class ClusterConfig(_Section):
    # auto: in-process or a LocalCluster, chosen per run from cores and batches (executor.py)
    kind: Literal["auto", "local", "address", "slurm", "none"] = "auto"
    n_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    address: str | None = None
    scheduler_file: Path | None = None
    batches_per_worker: int = Field(
        2,
        ge=1,
        le=256,
        description="batches a worker holds at once (Dask threads per worker); inference runs one at a "
        "time per worker, so 2 overlaps decoding, maps and writing of one batch with inference of another",
    )
    max_in_flight: int = Field(
        0,
        ge=0,
        le=MAX_JOBS,
        description="batches submitted at once; 0 = batches_per_worker + 1 per worker",
    )
    retries: int = Field(2, ge=0, le=100)
    connect_timeout: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds to wait for a scheduler file and a scheduler connection",
    )
    stall_minutes: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="on a Dask cluster, stop when no batch finishes for this long (0: never)",
    )
    worker_env: dict[str, str] = Field(
        default_factory=dict, description="environment of local/SLURM worker processes"
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _address_given(self) -> ClusterConfig:
        if self.kind == "address" and not (self.address or self.scheduler_file):
            raise ValueError(
                "cluster.kind 'address' needs cluster.address or cluster.scheduler_file"
            )
        if self.address is not None and not _ADDRESS.match(self.address):
            raise ValueError(
                f"cluster.address {_short(self.address)} is not a scheduler address; "
                "give one such as tcp://head-node:8786"
            )
        return self


class Config(_Section):
    model: ModelConfig
    data: DataConfig
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    output: OutputConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(item: str, flag: str = "--set") -> tuple[list[str], Any]:
    """`a.b=value` with the value read as YAML (so `[1, 2]`, `true`, `3` keep their types)."""
    key, sep, raw = item.partition("=")
    if sep and key.strip() and any(not part.strip() for part in key.strip().split(".")):
        raise ConfigError(f"{flag} {item!r}: the key has an empty part; write it as a.b.c")
    if not sep or not key.strip():
        example = "inference.batch_size=64" if flag == "--set" else "endpoint_url=http://host:9000"
        raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} {example}")
    if not raw.strip():  # an empty path would resolve to the config's own folder
        raise ConfigError(
            f"{flag} {item!r}: no value after '='; give one (null unsets an optional key)"
        )
    try:
        value = load_yaml(raw)
    except (DuplicateKeyError, NestingError) as exc:
        raise ConfigError(f"{flag} {_short(item)}: {exc}") from None
    except yaml.YAMLError:
        value = raw
    return [part.strip() for part in key.strip().split(".")], value


def apply_overrides(
    data: dict[str, Any], overrides: list[str], flag: str = "--set"
) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item, flag)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{flag} {item!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return data


# Parts of a pydantic error location that name its validators, not the user's keys:
# `output.store.lax-or-strict[lax=union[...]]` is `output.store`.
_TYPE_PARTS = {"str", "int", "float", "bool", "list", "dict", "tuple", "literal", "none"}


def _user_loc(loc: tuple[Any, ...]) -> list[str]:
    out = []
    for part in loc:
        text = str(part)
        if "[" in text or "-" in text or text in _TYPE_PARTS:
            break
        out.append(text)
    return out


def _quote_hint(err: Any) -> str:
    """YAML turns `2024`, `1e3` and `2024-01-02` into numbers and dates: where text was
    wanted, say to quote it."""
    value = err.get("input")
    wants_text = any(w in err.get("msg", "") for w in ("string", "path"))
    if not wants_text or isinstance(value, bool):
        return ""
    if isinstance(value, int | float | datetime.date):
        kind = "date" if isinstance(value, datetime.date) else "number"
        return f"; YAML read it as a {kind}: put it in quotes"
    return ""


def _format_errors(exc: ValidationError, origin: str, overrides: Sequence[str] = ()) -> str:
    parts: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = ".".join(_user_loc(err["loc"]))
        if loc in seen:  # one line per key: a union reports each of its members
            continue
        seen.add(loc)
        start = len(parts)
        kind = err["type"]
        if kind == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        elif kind == "missing":
            parts.append(f"{loc}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            msg = msg if len(msg) <= 300 else msg[:297] + "..."
            got = (
                f" (got {_short(err['input'])})" if kind != "value_error" and "input" in err else ""
            )
            parts.append(f"{loc}: {msg}{got}{_quote_hint(err)}")
        setter = next(  # the last override of the key is the one that applies
            (
                o
                for o in reversed(overrides)
                if loc == (k := o.partition("=")[0].strip())
                or loc.startswith(k + ".")
                or k.startswith(loc + ".")  # `bogus.x=1` makes the unknown section `bogus`
            ),
            None,
        )
        if setter is not None and len(parts) > start:
            parts[-1] += f" (from --set {_short(setter)})"
    return (
        f"{origin}: "
        + "; ".join(parts[:5])
        + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")
    )


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Relative paths in a config are relative to the config file, not to the shell's folder;
    `~` is the user's home, as in a shell (not a folder named "~" beside the config)."""

    def rel(p: Path | str | None) -> Path | None:
        if p is None or isinstance(p, str):
            return None
        p = Path(os.path.expanduser(p))
        return p if p.is_absolute() else base / p

    updates = {
        "model": cfg.model.model_copy(
            update={"checkpoint": rel(cfg.model.checkpoint) or cfg.model.checkpoint}
        ),
        "output": cfg.output.model_copy(
            update={
                "store": rel(cfg.output.store) or cfg.output.store,
                "png_dir": rel(cfg.output.png_dir) or cfg.output.png_dir,
            }
        ),
        "inference": cfg.inference.model_copy(
            update={"cache_dir": rel(cfg.inference.cache_dir) or cfg.inference.cache_dir}
        ),
        "cluster": cfg.cluster.model_copy(
            update={"scheduler_file": rel(cfg.cluster.scheduler_file) or cfg.cluster.scheduler_file}
        ),
    }
    source = cfg.data.source
    if "://" not in source:
        source = os.path.expanduser(source)
        if not Path(source).is_absolute():
            source = str(base / source)
    updates["data"] = cfg.data.model_copy(update={"source": source})
    return cfg.model_copy(update=updates)


def parse_config(
    data: Any,
    origin: str = "<config>",
    base: Path | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Validate a config mapping; `base` is the folder relative paths refer to; `overrides`
    (``KEY=VALUE``, already applied) are named in the errors of the keys they set."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping with sections model, data, output, ...")
    _check_size(data, origin)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, overrides)) from None
    cfg = _resolve_paths(cfg, base or Path.cwd())
    _check_cache_apart(cfg, origin)
    return cfg


def _check_cache_apart(cfg: Config, origin: str) -> None:
    """The export cache may not be (or lie in, or hold) the store or png_dir: graphs written
    there first made the store's folder "not a vit-attention store", and a prune or an
    --overwrite would delete the other's files."""
    cache = cfg.inference.cache_dir
    if cache is None:
        return
    here = os.path.realpath(os.path.expanduser(cache))
    # the cache's own folders; a store beside them in the same folder is fine
    owned = [os.path.join(here, sub) for sub in ("onnx", "digests", "trt")]
    for key, other in (("output.store", cfg.output.store), ("output.png_dir", cfg.output.png_dir)):
        if other is None or "://" in str(other):
            continue
        there = os.path.realpath(other)
        if os.path.commonpath([here, there]) == there or any(
            os.path.commonpath([own, there]) == own for own in owned
        ):
            raise ConfigError(
                f"{origin}: inference.cache_dir {cache} and {key} {other} overlap; give the "
                "export cache a folder of its own"
            )


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config file ("-": standard input, with relative
    paths relative to the current folder)."""
    if str(path) == "-":
        return _load_config_text(
            lambda: sys.stdin.buffer.read().decode("utf-8"), "<stdin>", Path.cwd(), overrides
        )
    if "://" in str(path):
        raise ConfigError(
            f"config {path}: a config is a local file; download it first, or pipe it to "
            "`vit-attn run -`"
        )
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the YAML file in it")
    if path.exists() and not path.is_file():
        raise ConfigError(
            f"config file {path} is not a regular file (a device or a pipe?); give the YAML file"
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return _load_config_text(
        lambda: path.read_text(encoding="utf-8"), str(path), path.resolve().parent, overrides
    )


def _load_config_text(
    read: Callable[[], str], path: str, base: Path, overrides: list[str] | None
) -> Config:
    try:
        text = read()
        if len(text) > MAX_CONFIG_CHARS:  # before parsing: 4 MB of YAML parse for a minute
            raise ConfigError(
                f"{path}: {len(text):,} characters, more than any config needs "
                f"({MAX_CONFIG_CHARS:,} at most); long lists of images go in a .txt list file"
            )
        data = load_yaml(text)
    except (DuplicateKeyError, NestingError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping with sections model, data, output, ... "
            f"(the file holds a {type(data).__name__})"
        )
    _check_size(data, path)
    data = apply_overrides(data, overrides or [])
    if overrides:
        _check_size(data, f"{path} with --set")
    return parse_config(data, origin=path, base=base, overrides=overrides or ())
