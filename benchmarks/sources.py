"""The same images as a local folder, as WebDataset shards and as Parquet, side by side.

For each source kind, in one process (so every file the run opens is counted, by an audit
hook on `open`):

- listing: `open_source` alone (folder walk; tar headers; Parquet footers);
- read + decode: every batch read through the source's reader and decoded (no model), the
  part of a run that depends on the source;
- end to end: `prepare` (listing, model load with a cached export, store creation) plus
  `execute` in-process (`cluster.kind: none`, two batches in flight), as `vit-attn run`
  does it.

Variants alternate within each repeat, so background load hits them alike; the best repeat
is reported.

    python benchmarks/sources.py --images 512 --repeats 3
    python benchmarks/sources.py --quick          # 64 images, a smoke run
    python benchmarks/sources.py --s3 --images 512 --repeats 3

With --s3 the three sources are uploaded to a real S3 server on 127.0.0.1 (moto's
ThreadedMotoServer, as the tests use) and read through s3:// URLs; the counts are then HTTP
requests the server answered (one log record each) instead of files opened. A local server
answers in about a millisecond, so its timings understate what the request counts save
against a remote bucket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tests.packing import folder_files, write_parquet, write_shards  # noqa: E402

from pipeline import make_images  # noqa: E402  (benchmarks/pipeline.py)
from vit_attn.config import load_config  # noqa: E402
from vit_attn.datasource import open_source  # noqa: E402
from vit_attn.decode import load_batch  # noqa: E402
from vit_attn.orchestrate import execute  # noqa: E402
from vit_attn.plan import prepare  # noqa: E402


class OpenCounter:
    """Counts data files opened (below one of `roots`; the store is not counted). Python's
    `open` audit event sees builtins, Pillow, tarfile and fsspec's local files."""

    def __init__(self, roots: list[str]) -> None:  # path prefixes
        self.roots = tuple(roots)
        self.count = 0
        self.on = False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.on and event == "open" and isinstance(args[0], str | Path):
            if str(args[0]).startswith(self.roots):
                self.count += 1

    def measure(self, fn, *a, **kw):
        self.count, self.on = 0, True
        try:
            t = time.perf_counter()
            out = fn(*a, **kw)
            return out, time.perf_counter() - t, self.count
        finally:
            self.on = False


DATA_DIRS = ("images_", "shards_", "parquet_")  # what OpenCounter counts (not the stores)


class RequestCounter(logging.Handler):
    """Counts the requests a moto server answers: werkzeug logs one record per request."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self.on = False
        log = logging.getLogger("werkzeug")
        log.setLevel(logging.INFO)
        log.propagate = False
        for handler in list(log.handlers):  # werkzeug's own prints each request
            log.removeHandler(handler)
        log.addHandler(self)  # and werkzeug adds none while one is there

    def emit(self, record: logging.LogRecord) -> None:
        if self.on:
            self.count += 1

    measure = OpenCounter.measure


def serve_on_s3(sources: dict[str, str], work: Path) -> tuple[object, dict[str, str]]:
    """Start moto's S3 server on 127.0.0.1, point the AWS environment at it, upload the
    sources' folders to a bucket: the server and the same sources as s3:// URLs."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    remote = {}
    for kind, source in sources.items():
        local = Path(source) if kind == "folder" else Path(source).parent
        rel = local.relative_to(work)
        fs.put(str(local), f"bench/{rel}", recursive=True)
        remote[kind] = f"s3://bench/{rel}/" + ("" if kind == "folder" else Path(source).name)
    return server, remote


def build_sources(work: Path, n: int, per_shard: int, row_group: int) -> dict[str, str]:
    images = make_images(work / f"images_{n}", n)
    names = folder_files(images)
    shards = work / f"shards_{n}_{per_shard}"
    if not shards.exists():
        write_shards(images, names, shards, per_shard)
    parquet = work / f"parquet_{n}_{row_group}"
    if not parquet.exists():
        half = (len(names) + 1) // 2
        write_parquet(
            images, names[:half], parquet / "train-00000-of-00002.parquet", True, row_group
        )
        write_parquet(
            images, names[half:], parquet / "train-00001-of-00002.parquet", True, row_group
        )
    last = (n - 1) // per_shard
    return {
        "folder": str(images),
        "webdataset": str(shards / f"train-{{000000..{last:06d}}}.tar"),
        "parquet": str(parquet / "*.parquet"),
    }


def write_config(folder: Path, source: str, model: str, batch: int, cache: Path) -> Path:
    cfg = {
        "model": {"name": model, "seed": 0},
        "data": {"source": source},
        "attention": {"layers": [-1]},
        "inference": {"batch_size": batch, "cache_dir": str(cache)},
        "output": {"store": str(folder / "run.zarr"), "overlays": "mean"},
        "cluster": {"kind": "none"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_decode(source: str, prep, batch: int) -> int:
    images = open_source(source)
    n = 0
    for start in range(0, len(images.paths), batch):
        stop = min(start + batch, len(images.paths))
        if images.reader is None:
            items = [images.absolute(i) for i in range(start, stop)]
        else:
            locs = images.locators[start:stop] if images.locators is not None else None
            items = images.reader.read(images.paths[start:stop], locs).items
        _, errors = load_batch(items, prep)
        n += sum(e is None for e in errors)
    return n


def end_to_end(config: Path) -> tuple[int, float]:
    cfg = load_config(config)
    prepared = prepare(cfg, overwrite=True)
    summary = execute(prepared.plan, prepared.tasks, cfg.cluster, progress=False)
    return summary.images_ok, summary.seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=128, help="images per WebDataset shard")
    p.add_argument("--row-group", type=int, default=100, help="rows per Parquet row group")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vit-attn-bench")
    p.add_argument("--quick", action="store_true", help="64 images: a smoke run")
    p.add_argument("--json", type=Path)
    p.add_argument("--s3", action="store_true", help="read the sources from a local S3 server")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.per_shard, args.row_group, args.repeats = 64, 16, 20, 1
    work = args.workdir
    sources = build_sources(work, args.images, args.per_shard, args.row_group)
    counter: OpenCounter | RequestCounter = OpenCounter([f"{work}/{d}" for d in DATA_DIRS])
    unit = "files_opened"
    if args.s3:
        counter, unit = RequestCounter(), "requests"
        _, sources = serve_on_s3(sources, work)
    cache = work / "cache"
    configs = {
        k: write_config(work / f"sources-{k}", s, args.model, args.batch, cache)
        for k, s in sources.items()
    }
    prepare(load_config(configs["folder"]), overwrite=True)  # export once, outside the timings
    prep = prepare(load_config(configs["folder"]), overwrite=True).plan.preprocess
    results: dict[str, dict[str, list[float]]] = {k: {} for k in sources}

    def add(kind: str, key: str, value: float) -> None:
        results[kind].setdefault(key, []).append(value)

    for _ in range(args.repeats):
        for kind, source in sources.items():
            images, seconds, opened = counter.measure(open_source, source)
            add(kind, "list_s", seconds)
            add(kind, f"list_{unit}", opened)
            n, seconds, opened = counter.measure(read_decode, source, prep, args.batch)
            add(kind, "read_decode_img_s", n / seconds)
            add(kind, f"read_decode_{unit}", opened)
            (ok, run_s), seconds, opened = counter.measure(end_to_end, configs[kind])
            assert ok == args.images, (kind, ok)
            add(kind, "run_img_s", ok / run_s)
            add(kind, "end_to_end_img_s", ok / seconds)
            add(kind, f"end_to_end_{unit}", opened)

    def pick(key: str, values: list[float]) -> float:
        if key.endswith(unit):
            return statistics.median(values)
        return max(values) if key.endswith("img_s") else min(values)

    best = {kind: {k: pick(k, v) for k, v in r.items()} for kind, r in results.items()}
    print(
        f"{args.images} images (500x375 JPEG q90), {args.model}, batch {args.batch}, "
        f"{args.per_shard} per shard, row groups of {args.row_group}, best of {args.repeats}"
        + (", sources on a local S3 server (moto)" if args.s3 else "")
    )
    cols = (
        "list_s",
        "read_decode_img_s",
        "run_img_s",
        "end_to_end_img_s",
        f"list_{unit}",
        f"read_decode_{unit}",
        f"end_to_end_{unit}",
    )
    print(f"{'source':<11}" + "".join(f"{c:>26}" for c in cols))
    for kind, r in best.items():
        print(f"{kind:<11}" + "".join(f"{r[c]:>26.2f}" for c in cols))
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "best": best, "all": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
