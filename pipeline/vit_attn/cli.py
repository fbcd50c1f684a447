"""The `vit-attn` command: run, export, inspect, show, stats, demo.

User mistakes end in one line on stderr and a non-zero exit; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from .argparsing import OneLineParser
from .errors import (
    LIBRARY_LOGGERS,
    ConfigError,
    PipelineError,
    StoreError,
    describe_os_error,
    first_line,
    hide_library_tracebacks,
)
from .remote import is_url, location
from .worker_signals import TRACEBACKS_ENV, ignore_unnamed_image_warnings, warning_as_line

EXIT_OK, EXIT_FAILED_BATCHES, EXIT_USAGE = 0, 1, 2
EXIT_SIGINT, EXIT_SIGPIPE, EXIT_SIGTERM = 130, 141, 143  # 128 + signal number, as a shell says


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `kill PID`): handled exactly like Ctrl-C."""


# Dask's and tornado's loggers, silenced the moment a signal arrives: while the cluster is torn
# down they report cancelled keys and, from distributed's own `sync` (a known race when the
# interrupt lands before its future exists), a NameError traceback. None of it is the user's news.
TEARDOWN_LOGGERS = LIBRARY_LOGGERS


def _on_signal(signum: int, frame: Any) -> None:
    """Ctrl-C and SIGTERM: quiet the cluster's teardown, then unwind like KeyboardInterrupt."""
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        # distributed configures children such as tornado.application itself: set each one
        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] in TEARDOWN_LOGGERS:
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _parser() -> argparse.ArgumentParser:
    from .render import NORMALIZE_MODES

    p = OneLineParser(prog="vit-attn", description="ViT attention maps over whole image datasets.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a config into its Zarr store (resumes an existing one)")
    run.add_argument("config", help="the YAML config (- reads it from standard input)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set inference.batch_size=64 (repeatable)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: replace an existing store (its finished images are discarded)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--redo-changed",
        action="store_true",
        help="on resume, redo exactly the images whose files changed (size, mtime, or hash)",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="on resume, try the failed images again (a file that was briefly unreadable)",
    )

    exp = sub.add_parser(
        "export", help="export (or find in the cache) the ONNX graph; prints its path"
    )
    exp.add_argument("config", help="the YAML config (- reads it from standard input)")
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    # Readers of a store on object storage take its fsspec options as `output.storage_options`
    # would give them (the environment's AWS settings need none).
    remote = OneLineParser(add_help=False)  # parents share the class
    remote.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec option for a store URL, as in output.storage_options (value read as "
        "YAML; a.b=v nests), e.g. endpoint_url=http://host:9000; repeatable",
    )
    ins = sub.add_parser(
        "inspect",
        parents=[remote],
        help="model, layers, progress, failures and arrays of a store",
    )
    ins.add_argument("store", type=location, help="a store folder, or a URL (s3://bucket/run.zarr)")
    ins.add_argument("--errors", type=int, default=20, help="failed images to list (default 20)")

    show = sub.add_parser(
        "show", parents=[remote], help="render one image's attention from a store to a PNG"
    )
    show.add_argument("store", type=location)
    show.add_argument(
        "--image", required=True, help="index, or the image's path as listed in the store"
    )
    show.add_argument(
        "--layer", type=int, default=None, help="block index (default: the last stored)"
    )
    show.add_argument(
        "--head", default="mean", help="head index, or mean / max / min over heads, or grid"
    )
    show.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="the map's opacity (default: the run's output.overlay_alpha, as the stored overlays)",
    )
    show.add_argument(
        "--colormap", default=None, help="default: the run's output.colormap (inferno)"
    )
    show.add_argument(
        "--normalize",
        default="per_map",
        choices=NORMALIZE_MODES,
        help="colour scale: each map's own range, one range for all heads of the image, "
        "or a dataset-wide range per (layer, head) so images compare (default per_map)",
    )
    show.add_argument(
        "--mask",
        type=float,
        default=None,
        metavar="T",
        help="outline the smallest set of patches holding a fraction T of each map's mass (DINO)",
    )
    show.add_argument(
        "--map",
        default=None,
        choices=("cls", "pool", "received"),
        help="which stored map: cls_attention, pool_attention or received_attention "
        "(default: the pool's if the model has one, else CLS, else received)",
    )
    show.add_argument(
        "--latent",
        type=int,
        default=None,
        help="pool_attention with several latent queries: which one (default: their mean)",
    )
    show.add_argument("-o", "--output", type=Path, required=True)

    st = sub.add_parser(
        "stats",
        parents=[remote],
        help="per-(layer, head) attention statistics over the dataset; optional plots",
    )
    st.add_argument("store", type=location)
    st.add_argument(
        "--plots",
        type=Path,
        default=None,
        metavar="DIR",
        help="write PNG plots, summary.csv and per_layer.md here",
    )
    st.add_argument(
        "--write",
        action="store_true",
        help="store statistics computed from full attention in the store (when it has none)",
    )
    view = sub.add_parser(
        "view", help="browse a store's attention in a web browser (a local read-only server)"
    )
    view.add_argument("store", help="the store's path")
    view.add_argument("--port", type=int, default=8765, help="default 8765; 0 = any free port")
    view.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    cache = sub.add_parser(
        "cache", help="list the export cache (graphs, records); --prune what is unused"
    )
    cache.add_argument(
        "--dir",
        type=str,
        default=None,
        help="the cache folder (default: $VIT_ATTN_CACHE, else ~/.cache/vit-attn)",
    )
    cache.add_argument(
        "--prune", action="store_true", help="remove what was not used for --older-than days"
    )
    cache.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="age of last use beyond which --prune removes (default 30; what was used in "
        "the last hour always stays)",
    )
    cache.add_argument(
        "--dry-run", action="store_true", help="with --prune: list what would go, remove nothing"
    )

    for parser in sub.choices.values():  # `vit-attn run -v CONFIG` as well as `vit-attn -v run`
        parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as vit-attn -v"
        )
    sub.add_parser(
        "demo",
        add_help=False,
        help="generate demo images and run the bundled demo ViT on them (vit-attn demo --help)",
    )
    return p


ERROR_LINE_LIMIT = 2000


def _bounded(text: str) -> str:
    """One error line of readable length: a value echoed back (a 10 MB model name pasted by
    mistake) must not become a 10 MB line."""
    text = " ".join(text.split("\n"))
    if len(text) <= ERROR_LINE_LIMIT:
        return text
    keep = (ERROR_LINE_LIMIT - 50) // 2  # the start names the thing, the end what to do
    return f"{text[:keep]} ...({len(text) - 2 * keep} more characters)... {text[-keep:]}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose_first = argv[:1] in (["-v"], ["--verbose"])
    if argv[int(verbose_first) : int(verbose_first) + 1] == ["demo"]:
        from .demo import main as demo_main  # the demo driver owns its own options

        return demo_main((["-v"] if verbose_first else []) + argv[int(verbose_first) + 1 :])
    try:
        args = _parser().parse_args(argv)  # imports zarr and numpy: ~1 s
    except KeyboardInterrupt:
        print("vit-attn: interrupted before anything was done", file=sys.stderr)
        return EXIT_SIGINT
    logging.basicConfig(  # warnings read like the other lines; -v says where they come from
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "vit-attn: %(message)s",
    )
    # The warning filters and handler are put back when this command ends (a notebook goes on)
    kept_warnings = warnings.catch_warnings()
    kept_warnings.__enter__()
    tracebacks_env = os.environ.get(TRACEBACKS_ENV)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        # distributed's dashboard moving to another port is not the run's news (4 lines)
        warnings.filterwarnings(
            "ignore", message=r"Port \d+ is already in use", category=UserWarning
        )
        hide_library_tracebacks(*logging.root.handlers)
        warnings.showwarning = warning_as_line
        ignore_unnamed_image_warnings()
        # Hugging Face's download retries (offline: 40 lines, each twice, before our one line
        # that says the weights could not be loaded and what to do)
        # (its import sets its own level from HF_HUB_VERBOSITY; imported already: the level)
        hub_logger = logging.getLogger("huggingface_hub")
        hub_level, hub_env = hub_logger.level, os.environ.get("HF_HUB_VERBOSITY")
        hub_logger.setLevel(logging.ERROR)
        if hub_env is None:
            os.environ["HF_HUB_VERBOSITY"] = "error"
    else:  # LocalCluster workers keep distributed's own task tracebacks (worker_signals)
        os.environ[TRACEBACKS_ENV] = "1"
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        # a handler someone else chose (SIGINT ignored in a background job) stays theirs
        for sig, default in (
            (signal.SIGINT, signal.default_int_handler),
            (signal.SIGTERM, signal.SIG_DFL),
        ):
            if signal.getsignal(sig) is default:
                previous[sig] = signal.signal(sig, _on_signal)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "export":
            return _export(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "cache":
            return _cache(args)
        if args.command == "view":
            from .view import serve

            if not args.host.strip():  # binds every interface, and says "http://:PORT/"
                raise ConfigError(
                    "view --host is empty; give an address: 127.0.0.1 (this machine only, the "
                    "default) or 0.0.0.0 (every interface)"
                )

            serve(args.store, host=args.host, port=args.port)
            return EXIT_OK
        return _show(args)
    except PipelineError as exc:
        print(f"vit-attn: error: {_bounded(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `vit-attn inspect STORE | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush cannot fail again
        return EXIT_SIGPIPE
    except OSError as exc:  # disk full, permissions, a read-only mount: the environment's say
        print(f"vit-attn: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as exc:
        # A memory limit (ulimit -v, a cgroup) met where a thread or an array is made.
        if isinstance(exc, RuntimeError) and "can't start new thread" not in str(exc):
            raise
        detail = first_line(exc) or "no detail"
        print(
            f"vit-attn: error: out of memory ({type(exc).__name__}: {detail}); lower "
            "inference.batch_size or cluster.n_workers, or raise the memory limit",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        overwriting = getattr(args, "overwriting", [])
        steps = [
            *(["without --overwrite"] if "--overwrite" in overwriting else []),
            *(["with --set output.overwrite=false"] if "output.overwrite" in overwriting else []),
        ]
        how = (
            f"rerun {' and '.join(steps)} to resume (overwriting would discard them)"
            if steps
            else "rerun the same command to resume"
        )
        print(f"vit-attn: {what}; finished batches are kept, {how}", file=sys.stderr)
        return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        kept_warnings.__exit__(None, None, None)
        if not args.verbose:
            hub_logger.setLevel(hub_level)
            if hub_env is None:
                os.environ.pop("HF_HUB_VERBOSITY", None)
        if tracebacks_env is None:
            os.environ.pop(TRACEBACKS_ENV, None)
        else:
            os.environ[TRACEBACKS_ENV] = tracebacks_env


def _cache(args: argparse.Namespace) -> int:
    from .cachedir import cache_root
    from .cacheprune import DAY, prune, scan

    if args.dir is not None and not str(args.dir).strip():
        raise ConfigError("--dir is empty; give the cache folder (or leave --dir out)")
    if not args.prune and (args.older_than is not None or args.dry_run):
        raise ConfigError("--older-than and --dry-run go with --prune (vit-attn cache --prune ...)")
    if args.older_than is None:
        args.older_than = 30.0
    if not 0 <= args.older_than < float("inf"):  # also NaN
        raise ConfigError(
            f"--older-than must be a finite number of days >= 0, got {args.older_than}"
        )
    root = cache_root(None if args.dir is None else Path(os.path.expanduser(args.dir)))
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"the export cache {root} is a file, not a folder; check --dir or VIT_ATTN_CACHE"
        )
    if not root.exists():
        print(f"0 files in {root} (no export cache there yet)")
        return EXIT_OK
    if args.prune:
        gone = prune(root, args.older_than, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for e in gone:
            print(f"{verb} {e.kind:9s} {_human(e.size):>9s}  {e.path.name}")
        print(
            f"{verb} {len(gone)} files, {_human(sum(e.size for e in gone))}, unused for more than "
            f"{args.older_than:g} days, from {root}"
        )
        return EXIT_OK
    entries = scan(root)
    now = time.time()
    for e in entries:
        age = (now - e.last_used) / DAY
        print(f"{e.kind:9s} {_human(e.size):>9s}  last used {age:6.1f} days ago  {e.path.name}")
    print(f"{len(entries)} files, {_human(sum(e.size for e in entries))} in {root}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .lock import lock_for

    cfg = load_config(args.config, args.overrides)
    # what an interruption's "rerun to resume" must tell to leave out
    args.overwriting = [
        *(["--overwrite"] if args.overwrite else []),
        *(["output.overwrite"] if cfg.output.overwrite else []),
    ]
    run_id = uuid.uuid4().hex
    lock = lock_for(
        cfg.output.store, run_id, cfg.output.lock_stale_seconds, cfg.output.storage_options
    )
    lock.acquire()  # one writer per store, from planning to consolidation
    try:
        return _run_locked(args, cfg, run_id, lock)
    finally:
        from .orchestrate import writers_may_run

        if writers_may_run():
            # Stopped again while batches were finishing: they still write. The lock (its
            # heartbeat too) stays until this process ends; a rerun on this host takes it
            # over then, elsewhere once its heartbeat is stale.
            print(
                "vit-attn: batches in flight are still finishing; the store stays locked "
                "until this process ends",
                file=sys.stderr,
            )
        else:
            lock.release()


def _run_locked(args: argparse.Namespace, cfg: Any, run_id: str, lock: Any) -> int:
    from .orchestrate import execute, failed_batches_line
    from .plan import prepare
    from .sources import IMAGE_EXTENSIONS
    from .store import consolidate, store_counts

    prepared = prepare(
        cfg,
        overwrite=args.overwrite,
        run_id=run_id,
        redo_changed=args.redo_changed,
        retry_failed=args.retry_failed,
    )
    plan, tasks = prepared.plan, prepared.tasks
    todo = sum(len(t.paths) for t in tasks)
    verb = "resuming" if prepared.resumed else "writing"
    cluster = prepared.cluster or cfg.cluster
    where = (
        f"{cfg.cluster.kind}: {prepared.cluster_reason}"
        if prepared.cluster_reason
        else cluster.kind
    )
    pieces = (
        f", inferred {plan.infer_batch} at a time (the store's batches are {plan.spec.batch_size})"
        if 0 < plan.infer_batch < plan.spec.batch_size
        else ""
    )
    print(
        f"vit-attn: {verb} {plan.store_path}: {todo} of {prepared.n_images} images in {len(tasks)} batches to do "
        f"({cfg.model.name}, layers {list(plan.outputs.layers)}, {cfg.inference.backend}/{cfg.inference.device}/"
        f"{cfg.inference.precision}, cluster {where}{pieces})",
        file=sys.stderr,
    )
    images = prepared.images
    if images.repeated:
        print(
            f"vit-attn: listed {images.repeated} paths of {images.root} once only: they reach "
            f"files already listed through a symlinked folder (e.g. "
            f"{', '.join(images.repeated_examples)})",
            file=sys.stderr,
        )
    if images.skipped:
        print(
            f"vit-attn: skipped {images.skipped} files of {images.root} that are not images, "
            f"are hidden or have names that are not UTF-8 (e.g. "
            f"{', '.join(images.skipped_examples)}); images end in "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}",
            file=sys.stderr,
        )
    summary = execute(plan, tasks, cluster, progress=not args.no_progress)
    if lock.lost:
        raise StoreError(
            f"{plan.store_path} was taken over by another run while this one was stalled; "
            "this run stopped writing (its finished batches are kept if that run resumed them)"
        )
    consolidate(plan.store_path, plan.store_options)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary.stage_seconds.items())
    ok, failed, pending = store_counts(
        plan.store_path, plan.store_options
    )  # the store's truth, not the tasks' word
    print(
        f"vit-attn: done: {ok} ok, {failed} failed, {pending} pending of {ok + failed + pending} "
        f"images; this run {summary.images_per_second:.1f} img/s over {summary.seconds:.1f}s "
        f"(worker time: {stages or 'none'}; "
        f"{summary.batches_overlapped} of {summary.batches_done} batches overlapped)",
        file=sys.stderr,
    )
    print(
        f"vit-attn: store {plan.store_path}"
        + (f", PNGs in {plan.png_dir}" if plan.png_dir else ""),
        file=sys.stderr,
    )
    if summary.failed_batches or pending:
        why = failed_batches_line(summary.failed_batches)
        print(
            f"vit-attn: {len(summary.failed_batches)} batches could not be done{why}; "
            f"{pending} images stay pending: rerun the same command to retry them",
            file=sys.stderr,
        )
        return EXIT_FAILED_BATCHES
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from .config import load_config
    from .graphcache import resolve
    from .variant import describe, for_device

    cfg = load_config(args.config, args.overrides)
    print(resolve(cfg, need_graph=True).onnx_path)
    variant = for_device(cfg.inference.device)
    print(
        f"graph for inference.device {cfg.inference.device}: {variant}, {describe(variant)}; "
        "input uint8 [B, H, W, 3] pixels",
        file=sys.stderr,
    )
    return EXIT_OK


def _store_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `--storage-option` pairs of a reader command, as fsspec options."""
    from .config import apply_overrides

    if not args.storage_options:
        return {}
    if not is_url(args.store):
        raise ConfigError(
            f"--storage-option: {args.store} is a local path; the options apply to URLs only"
        )
    return apply_overrides({}, args.storage_options, flag="--storage-option")


def _open_readonly(path: Path | str, options: dict[str, Any]) -> Any:
    import zarr

    from .remote import zarr_store
    from .store import readable_attrs

    readable_attrs(path, options)
    return zarr.open_group(zarr_store(path, options, read_only=True), mode="r")


def _disk_size(path: Path | str, options: dict[str, Any], name: str = "") -> int:
    if is_url(path):  # object storage: the sizes of the objects under the prefix
        from .remote import join, url_fs

        fs, inner = url_fs(join(str(path), name) if name else str(path), options)
        return int(fs.du(inner, total=True))
    path = Path(path) / name if name else Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    """A byte count in decimal units (1 MB = 10^6 bytes), as `du --si` and disk vendors say."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from .store import (
        STATUS_FAILED,
        STATUS_OK,
        STATUS_PENDING,
        describe_missing_files,
        images_missing_files,
        reader_status,
    )

    if args.errors < 0:
        raise ConfigError(f"--errors must be a count >= 0, got {args.errors}")
    options = _store_options(args)
    group = _open_readonly(args.store, options)
    attrs = dict(group.attrs)
    model = attrs.get("model", {})
    status = reader_status(group["status"], args.store)
    counts = {
        name: int((status == code).sum())
        for code, name in (
            (STATUS_OK, "ok"),
            (STATUS_FAILED, "failed"),
            (STATUS_PENDING, "pending"),
        )
    }
    print(f"store      {args.store}  (format_version {attrs.get('format_version')})")
    print(
        f"model      {model.get('name')}  weights {model.get('weights')}  depth {model.get('depth')}  "
        f"heads {model.get('num_heads')}  prefix tokens {model.get('num_prefix_tokens')}  grid {model.get('grid')}  "
        f"input {model.get('input_size')}"
    )
    print(_token_line(attrs))
    kind = model.get("layer_kind", "self_attention")
    what = (
        "  (class-attention blocks: the class token's row only)"
        if kind == "class_attention"
        else ""
    )
    print(f"layers     {group['layer'][:].tolist()}{what}")
    print(
        f"images     {status.size}: {counts['ok']} ok, {counts['failed']} failed, {counts['pending']} pending"
    )
    damaged = images_missing_files(group, status)
    if damaged:
        print(
            f"damaged    finished images whose store files are missing (read as fill values): "
            f"{describe_missing_files(damaged)}; `vit-attn run CONFIG` redoes their batches"
        )
    failed = np.flatnonzero(status == STATUS_FAILED)
    if failed.size:
        paths, errors = group["image_path"], group["error"]
        print(f"failed     (first {min(args.errors, failed.size)} of {failed.size})")
        for i in failed[: args.errors]:
            print(f"  [{i}] {paths[int(i)]}: {errors[int(i)]}")
    print("arrays")
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        dims = arr.metadata.dimension_names or ()
        shape = " x ".join(f"{d}={s}" for d, s in zip(dims, arr.shape))
        print(
            f"  {name:<14} {str(arr.dtype):<8} {shape:<60} {_human(_disk_size(args.store, options, name)):>10}"
        )
    print(f"total      {_human(_disk_size(args.store, options))}")
    return EXIT_OK


def _token_line(attrs: dict[str, Any]) -> str:
    """Token roles for `inspect`; stores written before roles were recorded say so."""
    from .roles import describe_prefix

    roles = attrs.get("token_roles")
    if not isinstance(roles, dict):
        return "tokens     roles not recorded (store written before token_roles)"
    pool = roles.get("pooling")
    if pool == "attention_pool":
        n = roles.get("pool_latents")
        pool = f"attention_pool ({n} latent {'query' if n == 1 else 'queries'})"
    return (
        f"tokens     prefix [{describe_prefix(roles.get('prefix_roles', []))}]  "
        f"class token {'yes' if roles.get('has_class_token') else 'no'}  pooling {pool}  "
        f"maps {', '.join(roles.get('maps', []))}"
    )


def _show(args: argparse.Namespace) -> int:
    from .render import render_image

    args.output = Path(os.path.expanduser(args.output))  # also when quoted: '~/x.png'
    if args.output.suffix.lower() != ".png":
        raise PipelineError(f"-o {args.output}: show writes a PNG; give a name ending in .png")
    _check_output_path("-o", args.output, args.store, folder=False)
    options = _store_options(args)
    group = _open_readonly(args.store, options)
    out = render_image(
        group,
        args.store,
        args.image,
        layer=args.layer,
        head=args.head,
        alpha=args.alpha,
        cmap=args.colormap,
        normalize=args.normalize,
        mask=args.mask,
        map_name=args.map,
        latent=args.latent,
        storage_options=options,
    )
    from .overlay import save_png

    save_png(out, args.output)
    print(args.output)
    return EXIT_OK


def _check_output_path(flag: str, path: Path, store: Path | str, folder: bool) -> None:
    """Before any work: a picture or plot folder that cannot be made, or that would land in
    the store (its files would sit among the store's arrays), is refused in one line."""
    from .outputs import file_in_the_way, resolved_inside  # the rules png_dir is checked by

    if folder and path.exists() and not path.is_dir():
        raise PipelineError(f"{flag} {path} is a file; give a folder")
    if not folder and path.is_dir():
        raise PipelineError(f"{flag} {path} is a folder; give a file name ending in .png")
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise PipelineError(f"{flag} {path}: {blocked} is a file, not a folder")
    local = str(store).removeprefix("file://") if str(store).startswith("file://") else store
    if not is_url(local) and resolved_inside(path, local):
        raise PipelineError(f"{flag} {path} is inside the store {store}; write it elsewhere")


def _refuse_missing_files(store: str, options: dict[str, Any], names: list[str]) -> None:
    """StoreError if finished images of these arrays have lost their store files: statistics
    over zarr's fill values would be wrong numbers with nothing to show it."""
    from .store import describe_missing_files, images_missing_files, reader_status

    group = _open_readonly(store, options)
    found = images_missing_files(group, reader_status(group["status"], store))
    found = {name: rows for name, rows in found.items() if name in names}
    if found:
        raise StoreError(
            f"{store} is damaged: finished images have lost their store files "
            f"({describe_missing_files(found)}); rerun `vit-attn run CONFIG` to redo them"
        )


def _stats(args: argparse.Namespace) -> int:
    from .analysis import (
        compute_stats_from_attention,
        format_table,
        markdown_layer_means,
        stat_names,
        summarise,
        write_plots,
    )
    from .store import open_dataset

    options = _store_options(args)
    # refuses what is not a readable store (store.readable_attrs); lost files: refused below
    ds = open_dataset(args.store, storage_options=options, check_files=False)
    _refuse_missing_files(args.store, options, [*stat_names(ds), "attention", "status"])
    if args.plots is not None:
        args.plots = Path(os.path.expanduser(args.plots))
        _check_output_path("--plots", args.plots, args.store, folder=True)
    if args.write and stat_names(ds):
        print(
            f"vit-attn: {args.store} already holds statistics {stat_names(ds)}; --write has "
            "nothing to add",
            file=sys.stderr,
        )
    if not stat_names(ds):
        if "attention" not in ds.data_vars:
            raise PipelineError(
                f"{args.store} holds no statistics and no full attention to compute them from; "
                "run with attention.stats: true (or attention.full: true)"
            )
        print(
            "vit-attn: computing statistics from the stored full attention"
            + (" and writing them into the store" if args.write else ""),
            file=sys.stderr,
        )
        stats = compute_stats_from_attention(args.store, write=args.write, storage_options=options)
        ds = ds.assign({name: stats[name] for name in stats.data_vars})
    try:
        table = summarise(ds)
    except (PipelineError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged chunk: codec and checksum errors
        raise StoreError(
            f"{args.store} is damaged: a store file cannot be read ({first_line(exc)}); "
            "`vit-attn inspect` and `vit-attn show` name the images it holds"
        ) from None
    print(format_table(table))
    if args.plots:  # (checked to be a folder or absent before any work)
        args.plots.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.plots / "summary.csv")
        (args.plots / "per_layer.md").write_text(markdown_layer_means(table) + "\n")
        for path in write_plots(table, ds, args.plots):
            print(path, file=sys.stderr)
        print(f"{args.plots / 'summary.csv'}\n{args.plots / 'per_layer.md'}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
