"""`vit-attn cache`: what the export cache holds, and pruning what is unused (real files, ages
set with os.utime; one record made by a real export to check that a cache hit counts as use)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from vit_attn.cacheprune import DAY, prune, scan
from vit_attn.cli import main as cli_main
from vit_attn.config import parse_config
from vit_attn.graphcache import cache_key, record_path, resolve

from .helpers import MODEL

NOW = time.time()


def put(path: Path, size: int, days_ago: float, content: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if content is not None else b"x" * size)
    t = NOW - days_ago * DAY
    os.utime(path, (t, t))
    return path


DIGEST = "0123456789abcdef0123456789abcdef.json"
ENGINE = "TensorrtExecutionProvider_TRTKernel_graph_main_graph_1234_0_0_sm80.engine"


def g(label: str) -> str:
    """A graph's (and its record's) name as vit-attn writes it, for a test label."""
    return f"vit-fp32-{hashlib.sha256(label.encode()).hexdigest()[:20]}"


def record(cache: Path, name: str, graph: Path | None, days_ago: float) -> Path:
    data = json.dumps({"record": 1, "onnx_path": str(graph) if graph else None}).encode()
    return put(cache / "onnx" / f"{name}.facts.json", 0, days_ago, data)


@pytest.fixture()
def cache(tmp_path) -> Path:
    root = tmp_path / "cache"
    onnx = root / "onnx"
    old_graph = put(onnx / (g("old") + ".onnx"), 3000, 90)
    record(root, g("old"), old_graph, 90)
    # Exported long ago, but its record was used yesterday: the graph is in use.
    kept_graph = put(onnx / (g("kept") + ".onnx"), 2000, 90)
    record(root, g("kept"), kept_graph, 1)
    put(onnx / (g("orphan") + ".onnx"), 1000, 60)  # no record names it
    put(onnx / (g("young") + ".onnx"), 500, 2)  # no record yet: an export just finished
    record(root, g("torch-only"), None, 45)  # torch backend: a record without a graph
    put(onnx / "tmpab12cd34.onnx", 700, 3)  # an export killed three days ago
    put(onnx / "tmpnow_1234.onnx", 700, 0.01)  # an export writing right now
    put(root / "digests" / DIGEST, 10, 40)
    put(root / "trt" / ENGINE, 4000, 31)
    return root


def names(entries) -> set[str]:
    return {e.path.name for e in entries}


def test_prune_removes_only_what_is_unused_and_keeps_what_a_record_uses(cache):
    assert len(scan(cache)) == 11
    dry = prune(cache, 30, dry_run=True, now=NOW)
    expected = {
        g("old") + ".onnx",
        g("old") + ".facts.json",
        g("orphan") + ".onnx",
        g("torch-only") + ".facts.json",
        "tmpab12cd34.onnx",
        DIGEST,
        ENGINE,
    }
    assert names(dry) == expected
    assert len(scan(cache)) == 11  # a dry run removes nothing
    gone = prune(cache, 30, now=NOW)
    assert names(gone) == expected
    left = names(scan(cache))
    assert left == {
        g("kept") + ".onnx",
        g("kept") + ".facts.json",
        g("young") + ".onnx",
        "tmpnow_1234.onnx",
    }
    # Pruning everything unused for 0 days still leaves an export in progress alone, and a
    # graph used minutes ago: a run that planned with it has workers about to open it.
    starting = put(cache / "onnx" / (g("starting") + ".onnx"), 900, 10 / (24 * 60))
    prune(cache, 0, now=NOW)
    assert names(scan(cache)) == {"tmpnow_1234.onnx", starting.name}


def test_a_record_goes_with_its_graph(cache, tmp_path):
    young_record = record(cache, g("young-record"), cache / "onnx" / (g("orphan") + ".onnx"), 0)
    os.utime(young_record, (NOW - 60 * DAY, NOW - 60 * DAY))
    gone = names(prune(cache, 30, now=NOW))
    assert {g("orphan") + ".onnx", g("young-record") + ".facts.json"} <= gone


def test_cli_lists_and_prunes_in_one_line_each(cache, capsys):
    assert cli_main(["cache", "--dir", str(cache)]) == 0
    out = capsys.readouterr().out.splitlines()
    total = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert out[-1].startswith(f"11 files, {total / 1000:.1f} KB in ") and len(out) == 12
    assert any(
        line.startswith("graph") and "last used   90.0 days ago" in line
        for line in out
        if line.endswith(g("old") + ".onnx")
    )
    assert cli_main(["cache", "--dir", str(cache), "--prune", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("would remove 7 files")
    for bad in ("-1", "nan", "inf"):
        assert cli_main(["cache", "--dir", str(cache), "--prune", "--older-than", bad]) == 2
        assert "--older-than must be a finite number of days >= 0" in capsys.readouterr().err
    assert cli_main(["cache", "--dir", str(cache / "nothing-here")]) == 0
    assert capsys.readouterr().out.strip().startswith("0 files")
    # Options that do nothing without --prune, and an empty --dir (the current folder, which
    # --prune would have swept), are refused.
    for args, words in [
        (["--older-than", "3"], "go with --prune"),
        (["--dry-run"], "go with --prune"),
    ]:
        assert cli_main(["cache", "--dir", str(cache), *args]) == 2
        assert words in capsys.readouterr().err
    assert cli_main(["cache", "--dir", "", "--prune"]) == 2
    assert "--dir is empty" in capsys.readouterr().err


@pytest.mark.slow  # an export
def test_a_cache_hit_counts_as_use(tmp_path, small_dataset, export_cache):
    cfg_dict = {
        "model": MODEL,
        "data": {"source": str(small_dataset)},
        "attention": {"layers": [1]},
        "inference": {"cache_dir": str(export_cache)},
        "output": {"store": str(tmp_path / "run.zarr")},
    }
    cfg = parse_config(yaml.safe_load(yaml.safe_dump(cfg_dict)), base=tmp_path)
    facts = resolve(cfg)
    path = record_path(cfg, cache_key(cfg))
    old = NOW - 100 * DAY
    os.utime(path, (old, old))
    os.utime(facts.onnx_path, (old, old))
    assert resolve(cfg).cached
    entries = {e.path.name: e for e in scan(Path(export_cache))}
    assert entries[path.name].last_used > NOW - DAY
    assert entries[Path(facts.onnx_path).name].last_used > NOW - DAY  # used via its record
    assert Path(facts.onnx_path).name not in names(prune(Path(export_cache), 30, dry_run=True))


def test_prune_passes_over_what_is_not_a_plain_file_and_goes_on(cache, tmp_path):
    # A folder named like a graph stopped the prune at "Is a directory", with the digests
    # already gone and nothing said of what went.
    odd = cache / "onnx" / "adir.onnx"
    odd.mkdir()
    (odd / "inside").write_text("not ours")
    t = NOW - 90 * DAY
    os.utime(odd, (t, t))
    link = cache / "onnx" / "alink.onnx"
    link.symlink_to(tmp_path / "elsewhere.onnx")
    gone = prune(cache, 30, now=NOW)
    assert g("old") + ".onnx" in names(gone) and DIGEST in names(gone)
    assert odd.is_dir() and (odd / "inside").is_file() and link.is_symlink()
    assert not (cache / "onnx" / (g("old") + ".onnx")).exists()


def test_tensorrt_engines_go_in_the_configured_cache(tmp_path, small_dataset, export_cache):
    # inference.cache_dir holds every cache (cachedir.py); the TensorRT engines went to the
    # default cache regardless, where `vit-attn cache` of the configured one never saw them.
    from vit_attn.plan import prepare

    cfg_dict = {
        "model": MODEL,
        "data": {"source": str(small_dataset)},
        "inference": {"cache_dir": str(export_cache)},
        "output": {"store": str(tmp_path / "run.zarr")},
        "cluster": {"kind": "none"},
    }
    cfg = parse_config(yaml.safe_load(yaml.safe_dump(cfg_dict)), base=tmp_path)
    assert prepare(cfg).plan.runtime.trt_cache_dir == Path(export_cache) / "trt"


def test_prune_removes_only_files_named_as_vit_attn_names_its_own(cache):
    # Any *.onnx in onnx/ and any file under digests/ or trt/ was pruned: a cache_dir that
    # is a project folder lost its own models, engines and notes.
    t = NOW - 90 * DAY
    mine = [
        cache / "onnx" / "resnet50_finetuned.onnx",
        cache / "onnx" / "vit-fp32-final.onnx",
        cache / "onnx" / "notes.facts.json",
        cache / "onnx" / "tmp_backup.json",
        cache / "digests" / "README.md",
        cache / "trt" / "prod.engine",
        cache / "trt" / "fp16" / ENGINE,
    ]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
        os.utime(path, (t, t))
    assert not {p.name for p in mine if p.parent.name != "fp16"} & names(scan(cache))
    gone = prune(cache, 30, now=NOW)
    assert g("old") + ".onnx" in names(gone) and ENGINE in names(gone)
    assert all(p.read_text() == "mine" for p in mine)
