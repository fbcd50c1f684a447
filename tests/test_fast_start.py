"""Fast start: a run whose graph is cached reads the model's facts from JSON, never torch.

Each run is a fresh `python` process, so `sys.modules` says what the run itself imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import save_file
from timm.utils import AttentionExtract

from vit_attn.config import parse_config
from vit_attn.decode import Preprocess, load_image, normalize
from vit_attn.errors import CheckpointError
from vit_attn.filemode import umask
from vit_attn.graphcache import (
    _rebuild,
    cache_key,
    read_facts,
    record_path,
    resolve,
    write_facts,
)

from . import imagefactory
from .conftest import sharpened_model
from .helpers import MODEL, assert_stores_equal

HEAVY = ("torch", "timm", "onnx")
# Runs the CLI and reports, on its last stdout line, which heavy modules the run imported.
RUNNER = (
    "import json, sys\n"
    "from vit_attn.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
)


def run_cli(*args: str, cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["stderr"] = proc.stderr
    return report


def save_checkpoint(path: Path, factor: float) -> Path:
    loaded = sharpened_model(
        MODEL["name"], factor=factor, seed=0, img_size=tuple(MODEL["img_size"]), **MODEL["kwargs"]
    )
    save_file(loaded.model.state_dict(), str(path))
    return path


def config_file(folder: Path, images: Path, checkpoint: Path, cache: Path, store: str) -> Path:
    cfg = {
        "model": {**MODEL, "checkpoint": str(checkpoint)},
        "data": {"source": str(images)},
        "attention": {"layers": [-1]},
        "inference": {"batch_size": 4, "threads": 1, "cache_dir": str(cache)},
        "output": {"store": store, "overlays": "mean"},
        "cluster": {"kind": "none"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{store}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fast-start-images")
    imagefactory.write_rgb_set(root, [(40 + 9 * i, 50 + 5 * i) for i in range(6)])
    return root


@pytest.mark.slow
def test_second_run_imports_no_torch_and_writes_the_same_store(tmp_path, images):
    cache = tmp_path / "cache"
    ckpt = save_checkpoint(tmp_path / "w.safetensors", 16.0)
    first = run_cli("run", str(config_file(tmp_path, images, ckpt, cache, "a")), cwd=tmp_path)
    assert "torch" in first["heavy"]  # nothing cached: the model was built and exported
    records = list((cache / "onnx").glob("*.facts.json"))
    assert len(records) == 1

    # Same config, new store: everything planning needs comes from the record.
    second = run_cli("run", str(config_file(tmp_path, images, ckpt, cache, "b")), cwd=tmp_path)
    assert second["heavy"] == [], second
    assert_stores_equal(tmp_path / "a", tmp_path / "b")
    a, b = (dict(zarr.open_group(str(tmp_path / s), mode="r").attrs) for s in "ab")
    for key in ("fingerprint", "fingerprint_inputs", "model", "preprocess"):
        assert a[key] == b[key], key

    # A complete store: the rerun resumes nothing, still without torch.
    rerun = run_cli("run", str(config_file(tmp_path, images, ckpt, cache, "b")), cwd=tmp_path)
    assert rerun["heavy"] == [] and "in 0 batches" in rerun["stderr"]
    # `vit-attn export` answers from the record too.
    exported = run_cli("export", str(config_file(tmp_path, images, ckpt, cache, "b")), cwd=tmp_path)
    assert exported["heavy"] == []
    # and names the attention variant it wrote (the CPU keeps the plain graph)
    assert "graph for inference.device cpu: plain" in exported["stderr"]


@pytest.mark.slow
def test_a_copied_cache_uses_its_own_graphs(tmp_path, images):
    # Records named the graph by its absolute path: a copied cache read the graph from the old
    # folder, `vit-attn cache` saw its own copy as unused, and --prune deleted it.
    import shutil

    from vit_attn.cacheprune import scan

    first, copy = tmp_path / "cache", tmp_path / "copied"
    ckpt = save_checkpoint(tmp_path / "w.safetensors", 16.0)
    run_cli("run", str(config_file(tmp_path, images, ckpt, first, "a")), cwd=tmp_path)
    shutil.copytree(first, copy)
    cfg = parse_config(yaml.safe_load(config_file(tmp_path, images, ckpt, copy, "b").read_text()))
    facts = resolve(cfg)
    assert facts.cached and Path(facts.onnx_path).parent == copy / "onnx"
    graphs = {e.path.name: e for e in scan(copy) if e.kind == "graph"}
    records = [e for e in scan(copy) if e.kind == "record"]
    assert records[0].graph == (copy / "onnx" / Path(facts.onnx_path).name).resolve()
    shutil.rmtree(first)  # the copy stands alone
    again = run_cli("run", str(config_file(tmp_path, images, ckpt, copy, "b")), cwd=tmp_path)
    assert again["heavy"] == [], again  # a cache hit, not a rebuild
    assert list(graphs)


@pytest.mark.slow
def test_a_deleted_graph_or_a_corrupt_record_is_rebuilt(tmp_path, images):
    cache = tmp_path / "cache"
    ckpt = save_checkpoint(tmp_path / "w.safetensors", 16.0)
    config = config_file(tmp_path, images, ckpt, cache, "a")
    cfg = parse_config(yaml.safe_load(config.read_text()), base=tmp_path)
    facts = resolve(cfg)
    assert not facts.cached and Path(facts.onnx_path).is_file()
    assert resolve(cfg).cached
    # Graph and record readable like any file written here (a cache shared by a group).
    for written in (Path(facts.onnx_path), record_path(cfg, cache_key(cfg))):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask(), written

    Path(facts.onnx_path).unlink()  # someone cleaned the cache folder by hand
    again = resolve(cfg)
    assert not again.cached and Path(again.onnx_path).is_file()

    record = record_path(cfg, cache_key(cfg))
    record.write_text('{"record": 1, "layout": {"num_heads"')  # truncated by a full disk
    rebuilt = resolve(cfg)
    assert not rebuilt.cached and rebuilt.layout == facts.layout
    assert resolve(cfg).cached

    # A record edited in place (a wrong layer list would label layer 1's maps as layer 0):
    # its digest no longer matches, so it is rebuilt from the model, not trusted.
    data = json.loads(record.read_text())
    data["outputs"]["layers"] = [0]
    record.write_text(json.dumps(data))
    edited = resolve(cfg)
    assert not edited.cached and edited.outputs == facts.outputs

    # A truncated or emptied graph is exported again (it failed every batch, every rerun).
    graph = Path(resolve(cfg).onnx_path)
    good = graph.read_bytes()
    for damaged in (good[: len(good) // 2], b""):
        graph.write_bytes(damaged)
        repaired = resolve(cfg)
        assert not repaired.cached and graph.read_bytes() == good

    # Changed at the same size: weights overwritten in place (still a valid graph, so it
    # would give wrong maps without failing) or a damaged header. Both are exported again.
    import onnx

    weights = max(
        (t.raw_data for t in onnx.load(str(graph)).graph.initializer), key=len
    )  # the largest weight tensor, found in the file by its bytes
    at = good.find(weights)
    assert at > 0
    overwritten = good[:at] + bytes(len(weights)) + good[at + len(weights) :]
    for damaged in (overwritten, b"\xff" * 64 + good[64:]):
        graph.write_bytes(damaged)
        repaired = resolve(cfg)
        assert not repaired.cached and graph.read_bytes() == good
        assert resolve(cfg).cached  # and the check does not make every later run a miss

    # The same through the CLI: one warning line, then the run works on the re-exported graph.
    graph.write_bytes(overwritten)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "run", str(config), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    said = [x for x in proc.stderr.splitlines() if "damaged" in x]
    assert len(said) == 1 and "content changed" in said[0] and "exporting it again" in said[0]
    assert graph.read_bytes() == good

    # A graph onnxruntime cannot parse that its record vouches for (an exporter bug, or a
    # record forged to match): one line that says what to do, and the run stops instead of
    # failing (and offering to retry) every batch.
    graph.write_bytes(b"\xff" * 64 + good[64:])
    vouched = dataclasses.replace(
        read_facts(record), onnx_sha256=hashlib.sha256(graph.read_bytes()).hexdigest()
    )
    assert write_facts(record, dataclasses.replace(vouched, cached=False))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "run", str(config), "--no-progress", "--overwrite"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [x for x in proc.stderr.splitlines() if x.startswith("vit-attn: error:")]
    assert len(errors) == 1 and "cannot load" in errors[0] and "delete it" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "to retry them" not in proc.stderr


def test_a_process_that_outlives_a_run_does_not_keep_the_old_checkpoint(tmp_path, images):
    # A worker of an existing scheduler (here: this process, in-process runs) keeps its model
    # between runs; with the torch backend it was keyed by the checkpoint's path, so a new
    # file under the same path was served the old weights (while the store said "new").
    from vit_attn.cli import main as cli_main

    cache = tmp_path / "cache"
    ckpt = save_checkpoint(tmp_path / "w.safetensors", 16.0)
    config = config_file(tmp_path, images, ckpt, cache, "s")
    data = yaml.safe_load(config.read_text())
    data["inference"]["backend"] = "torch"
    config.write_text(yaml.safe_dump(data))
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    old = zarr.open_group(str(tmp_path / "s"), mode="r")["cls_attention"][:]
    save_checkpoint(ckpt, 1.0)  # same path, new weights: attention no longer sharpened
    assert cli_main(["run", str(config), "--no-progress", "--overwrite"]) == 0
    new = zarr.open_group(str(tmp_path / "s"), mode="r")["cls_attention"][:]
    assert np.abs(new.astype(np.float32) - old.astype(np.float32)).max() > 1e-2


@pytest.mark.slow
def test_new_checkpoint_content_under_the_same_path_is_not_served_the_old_graph(tmp_path, images):
    cache = tmp_path / "cache"
    ckpt = tmp_path / "w.safetensors"
    save_checkpoint(ckpt, 16.0)
    run_cli("run", str(config_file(tmp_path, images, ckpt, cache, "old")), cwd=tmp_path)
    save_checkpoint(ckpt, 1.0)  # same path, new weights: attention no longer sharpened
    new = run_cli("run", str(config_file(tmp_path, images, ckpt, cache, "new")), cwd=tmp_path)
    assert "torch" in new["heavy"]  # a cache miss: the model was built again
    assert len(list((cache / "onnx").glob("*.facts.json"))) == 2

    old_g, new_g = (zarr.open_group(str(tmp_path / s), mode="r") for s in ("old", "new"))
    assert old_g.attrs["fingerprint"] != new_g.attrs["fingerprint"]
    assert old_g.attrs["model"]["weights"] != new_g.attrs["model"]["weights"]
    # The new store holds the new weights' attention (eager timm, independent of the graph).
    prep = Preprocess.from_dict(new_g.attrs["preprocess"])
    paths = new_g["image_path"][:]
    batch = np.stack([load_image(Path(new_g.attrs["image_root"]) / p, prep) for p in paths])
    model = sharpened_model(
        MODEL["name"], factor=1.0, seed=0, img_size=tuple(MODEL["img_size"]), **MODEL["kwargs"]
    )
    from safetensors.torch import load_file

    model.model.load_state_dict(load_file(str(ckpt)))
    with torch.no_grad():
        maps = list(
            AttentionExtract(model.model, method="hook")(
                torch.from_numpy(normalize(batch, prep))
            ).values()
        )
    gh, gw = model.layout.grid
    expected = maps[-1][:, :, 0, 1:].reshape(len(paths), -1, gh, gw).double().numpy()
    stored_new = new_g["cls_attention"][:, 0].astype(np.float64)
    stored_old = old_g["cls_attention"][:, 0].astype(np.float64)
    np.testing.assert_allclose(stored_new, expected, atol=2e-4, rtol=2e-3)
    assert np.abs(stored_old - expected).max() > 1e-2


def test_missing_checkpoint_is_one_clear_error(tmp_path, images):
    config = config_file(tmp_path, images, tmp_path / "gone.safetensors", tmp_path / "c", "a")
    cfg = parse_config(yaml.safe_load(config.read_text()), base=tmp_path)
    with pytest.raises(CheckpointError, match=r"gone\.safetensors does not exist"):
        resolve(cfg)


@dataclass(frozen=True)
class _Roles:
    """Stands in for a layout with fields added later (token roles): nested tuples and dicts."""

    grid: tuple[int, int]
    roles: tuple[tuple[str, int], ...]
    extra: dict[str, tuple[int, ...]] = field(default_factory=dict)


def test_records_rebuild_dataclasses_field_by_field():
    value = _Roles((14, 14), (("cls", 0), ("register", 4)), {"a": (1, 2)})
    from dataclasses import asdict

    assert _rebuild(_Roles, json.loads(json.dumps(asdict(value)))) == value
    with pytest.raises(ValueError, match="fields changed"):
        _rebuild(_Roles, {"grid": [14, 14]})


def test_checkpoint_digest_is_remembered_but_never_outlives_a_change_of_the_file(tmp_path):
    import hashlib
    import os
    import time

    from vit_attn.graphcache import file_sha256

    ckpt = tmp_path / "w.bin"
    ckpt.write_bytes(b"a" * 4096)
    memo = tmp_path / "cache"
    assert file_sha256(ckpt, memo) and not (memo / "digests").exists()  # just written: racy
    time.sleep(0.2)
    first = file_sha256(ckpt, memo)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()
    (record,) = (memo / "digests").glob("*.json")
    # The rerun trusts the remembered digest (no read of the file): shown by planting one.
    held = json.loads(record.read_text())
    record.write_text(json.dumps({**held, "sha256": "planted"}))
    assert file_sha256(ckpt, memo) == "planted"
    # Rewritten in place, same size, mtime put back (as `cp -p` or rsync -t would leave it):
    # the ctime moved, so the file is hashed again.
    st = ckpt.stat()
    time.sleep(0.2)  # past the kernel's timestamp tick
    ckpt.write_bytes(b"b" * 4096)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(ckpt, memo) == hashlib.sha256(b"b" * 4096).hexdigest()
    # Replaced by another file under the same name (new inode): hashed again.
    other = tmp_path / "other.bin"
    other.write_bytes(b"c" * 4096)
    os.replace(other, ckpt)
    time.sleep(0.2)
    assert file_sha256(ckpt, memo) == hashlib.sha256(b"c" * 4096).hexdigest()
    # A read-only or corrupt memo costs time, never the answer.
    for r in (memo / "digests").glob("*.json"):
        r.write_text("{not json")
    assert file_sha256(ckpt, memo) == hashlib.sha256(b"c" * 4096).hexdigest()


def test_a_graph_copied_over_another_without_its_record_is_never_used(tmp_path, images):
    # With its record gone, the run exported... into a name where a file already was: it
    # took that file (here another checkpoint's graph, the same size) as its own, recorded
    # its digest, and every later run labelled the other weights' maps with these.
    cache = tmp_path / "cache"
    cfgs = []
    for name, factor in (("a", 16.0), ("b", 1.0)):
        ckpt = save_checkpoint(tmp_path / f"{name}.safetensors", factor)
        config = config_file(tmp_path, images, ckpt, cache, name)
        cfgs.append(parse_config(yaml.safe_load(config.read_text()), base=tmp_path))
    a, b = (Path(resolve(c).onnx_path) for c in cfgs)
    good = a.read_bytes()
    assert a != b and a.stat().st_size == b.stat().st_size and good != b.read_bytes()
    record_path(cfgs[0], cache_key(cfgs[0])).unlink()
    a.write_bytes(b.read_bytes())
    again = resolve(cfgs[0])
    assert Path(again.onnx_path) == a and a.read_bytes() == good


def test_the_graphs_name_changes_with_the_code_and_the_libraries_that_build_it(
    monkeypatch, tmp_path
):
    # The record's key had the code digest and the onnx version; the graph's own name did
    # not, so a changed exporter (or onnx, which converts the mixed graph) found the old file.
    import vit_attn.export as export_module
    from vit_attn.graphcache import GRAPH_MODULES
    from vit_attn.model import load_model
    from vit_attn.specs import ModelSource, OutputSpec

    loaded = load_model(
        ModelSource(MODEL["name"], img_size=tuple(MODEL["img_size"]), kwargs=MODEL["kwargs"])
    )
    spec = OutputSpec(layers=(0,))
    before = export_module.export_fingerprint(loaded, spec, "fp32")
    monkeypatch.setattr(export_module, "code_digest", lambda: "edited")
    assert export_module.export_fingerprint(loaded, spec, "fp32") != before
    monkeypatch.undo()
    versions = {"onnx": "0.0", "onnxscript": "0.0"}
    monkeypatch.setattr(export_module, "package_version", lambda name: versions.get(name, "x"))
    assert export_module.export_fingerprint(loaded, spec, "fp32") != before
    # What a record holds besides the graph comes from these too.
    assert {"decode.py", "plan.py", "graphcache.py", "export.py"} <= set(GRAPH_MODULES)


def test_a_digest_is_remembered_only_once_the_file_is_older_than_its_timestamps_tick():
    import os

    from vit_attn.graphcache import _remember_after

    def stat(mtime_ns: int, ctime_ns: int) -> os.stat_result:
        seconds = (0, mtime_ns / 1e9, ctime_ns / 1e9)
        return os.stat_result(
            (0o100644, 1, 1, 1, 0, 0, 10, *seconds, *seconds, 0, mtime_ns, ctime_ns)
        )

    fine = 1_700_000_000_123_456_789
    whole = 1_700_000_000_000_000_000
    assert _remember_after(stat(fine, fine)) < 1.0
    # Whole seconds (ext4 with 128-byte inodes, some network file systems): a file rewritten
    # within the same second keeps its stat identity, so wait past it.
    assert _remember_after(stat(whole, whole)) > 1.0


def _hub_snapshot(hf_home: Path, weights: Path, commit: str) -> None:
    """`weights` as timm's hub repo of MODEL in a Hugging Face cache, at `commit` (main)."""
    repo = hf_home / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").write_bytes(weights.read_bytes())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_pretrained_weights_refreshed_in_the_cache_are_not_run_through_the_old_graph(
    tmp_path, images, monkeypatch
):
    # The record was keyed by the model's name: weights refreshed under the same tag in the
    # Hugging Face cache kept the graph (and weights digest) of the old ones, silently.
    from .s3server import free_port

    cache, hf = tmp_path / "cache", tmp_path / "hf"
    a = save_checkpoint(tmp_path / "a.safetensors", 16.0)
    b = save_checkpoint(tmp_path / "b.safetensors", 2.0)
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # unreachable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def pretrained(store: str) -> dict:
        path = config_file(tmp_path, images, a, cache, store)
        cfg = yaml.safe_load(path.read_text())
        cfg["model"].pop("checkpoint")
        cfg["model"]["pretrained"] = True
        path.write_text(yaml.safe_dump(cfg))
        return run_cli("run", str(path), cwd=tmp_path)

    def maps(store: str) -> np.ndarray:
        return zarr.open_array(tmp_path / store / "overlay", mode="r")[:]

    _hub_snapshot(hf, a, "1" * 40)
    assert "torch" in pretrained("p1")["heavy"]
    assert pretrained("p1b")["heavy"] == []  # unchanged weights: the record serves
    for name, ckpt in (("ra", a), ("rb", b)):
        run_cli("run", str(config_file(tmp_path, images, ckpt, cache, name)), cwd=tmp_path)
    np.testing.assert_array_equal(maps("p1"), maps("ra"))
    assert not np.array_equal(maps("ra"), maps("rb"))

    _hub_snapshot(hf, b, "2" * 40)  # the cache refreshed: main now names other weights
    second = pretrained("p2")
    assert "torch" in second["heavy"] and "changed in the local cache" in second["stderr"]
    np.testing.assert_array_equal(maps("p2"), maps("rb"))
    assert pretrained("p3")["heavy"] == []
    np.testing.assert_array_equal(maps("p3"), maps("rb"))
