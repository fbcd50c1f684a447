"""Config validation: errors name the key and the file; overrides keep YAML types."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml

from vit_attn.config import load_config, parse_config
from vit_attn.errors import ConfigError

BASE = {
    "model": {"name": "vit_tiny_patch16_224", "seed": 0},
    "data": {"source": "images/"},
    "output": {"store": "out/run.zarr"},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.attention.layers == [-1] and cfg.inference.batch_size == 32
    assert cfg.cluster.kind == "auto" and cfg.output.overlays == "mean"
    assert Path(cfg.data.source) == tmp_path / "images"
    assert cfg.output.store == tmp_path / "out" / "run.zarr"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, {**BASE, "attention": {"layerz": [1]}})
    with pytest.raises(ConfigError, match=rf"{path}: attention\.layerz: unknown key"):
        load_config(path)


def test_wrong_type_and_missing_section(tmp_path):
    with pytest.raises(ConfigError, match=r"inference\.batch_size"):
        load_config(write(tmp_path, {**BASE, "inference": {"batch_size": "lots"}}))
    with pytest.raises(ConfigError, match=r"output: required key is missing"):
        load_config(write(tmp_path, {k: v for k, v in BASE.items() if k != "output"}))
    with pytest.raises(ConfigError, match=r"inference\.device"):
        load_config(write(tmp_path, {**BASE, "inference": {"device": "tpu"}}))


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("output", {"store": "s3:/bucket/run.zarr"}, r"output\.store.*URL missing a slash"),
        ("output", {"store": "s3:bucket/run.zarr"}, r"URL missing a slash"),
        ("data", {"source": "gs:/bucket/images"}, r"data\.source.*URL missing a slash"),
        (
            "output",
            {"store": "out/run.zarr", "storage_options": {"anon": True}},
            r"output.*storage_options: store .* is a local path; options apply to URLs only",
        ),
    ],
    ids=["one-slash", "no-slash", "source-one-slash", "local-store-options"],
)
def test_a_url_missing_a_slash_is_not_a_local_folder(tmp_path, section, values, message):
    # `s3:/bucket/run.zarr` wrote a local store in a folder named "s3:", ignoring its options.
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**BASE, section: {**BASE[section], **values}}))
    # A Windows drive letter is not a scheme.
    load_config(write(tmp_path, {**BASE, "output": {"store": "C:/runs/run.zarr"}}))


def test_values_yaml_typed_as_numbers_or_dates_say_to_quote_them(tmp_path):
    # `store: 2024` gave ~530 characters of pydantic's union internals.
    data = {**BASE, "data": {"source": datetime.date(2024, 1, 2)}, "output": {"store": 2024}}
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    text = str(caught.value)
    assert "output.store: " in text and "lax-or-strict" not in text and len(text) < 500, text
    assert text.count("put it in quotes") == 2 and "read it as a date" in text


def test_overrides_keep_yaml_types(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "attention.layers=[0, -1]",
            "inference.batch_size=8",
            "attention.full=true",
            "model.img_size=[96, 128]",
        ],
    )
    assert (
        cfg.attention.layers == [0, -1]
        and cfg.inference.batch_size == 8
        and cfg.attention.full is True
    )
    assert cfg.model.img_size_pair == (96, 128)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, BASE), ["attention.full"])
    with pytest.raises(ConfigError, match=r"attention\.nope: unknown key \(from --set 'atten"):
        load_config(write(tmp_path, BASE), ["attention.nope=1"])
    # a mistake set by an override names it; one in the file does not
    bad = {**BASE, "inference": {"threads": -1}}
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, bad), ["inference.batch_size=0"])
    text = str(caught.value)
    assert "inference.batch_size: Input should be greater than or equal to 1 (got 0) (from " in text
    with pytest.raises(ConfigError, match=r"\(from --set 'inference.batch_size=0'\)"):
        load_config(write(tmp_path, BASE), ["inference.batch_size=4", "inference.batch_size=0"])
    assert text.endswith("inference.threads: Input should be greater than or equal to 0 (got -1)")
    # an override under a section that does not exist makes the section: it is named too
    with pytest.raises(ConfigError, match=r"bogus: unknown key \(from --set 'bogus\.x=1'\)$"):
        load_config(write(tmp_path, BASE), ["bogus.x=1"])


def test_the_export_cache_apart_from_the_outputs(tmp_path):
    # cache_dir == store: the export wrote its graph into the store's folder first, which
    # was then "not a vit-attention store"; a prune or --overwrite would delete the other's.
    for cache, out in [
        ("run.zarr", {"store": "run.zarr"}),
        ("run.zarr/cache", {"store": "run.zarr"}),
        (".", {"store": "onnx/run.zarr"}),
        ("c", {"store": "run.zarr", "png_dir": "c/digests/png"}),
    ]:
        cfg = {**BASE, "inference": {"cache_dir": cache}, "output": out}
        with pytest.raises(ConfigError, match=r"inference\.cache_dir .* overlap"):
            load_config(write(tmp_path, cfg))
    fine = {**BASE, "inference": {"cache_dir": "."}, "output": {"store": "run.zarr"}}
    assert load_config(write(tmp_path, fine)).inference.cache_dir == tmp_path


def test_a_config_that_is_a_device_or_a_pipe_is_said_so(tmp_path):
    # "/dev/null does not exist": it does, it is not a regular file
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in ("/dev/null", fifo):
        with pytest.raises(ConfigError, match="is not a regular file"):
            load_config(path)


def test_conflicts_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="either"):
        parse_config({**BASE, "model": {"name": "x", "pretrained": True, "checkpoint": "w.pth"}})
    with pytest.raises(ConfigError, match="cluster.address"):
        parse_config({**BASE, "cluster": {"kind": "address"}})
    # The torch backend's mixed precision is CUDA autocast: on the CPU it ran fp32 unsaid.
    with pytest.raises(ConfigError, match="precision 'mixed' with backend 'torch' needs device"):
        parse_config({**BASE, "inference": {"backend": "torch", "precision": "mixed"}})
    parse_config(
        {**BASE, "inference": {"backend": "torch", "precision": "mixed", "device": "cuda"}}
    )
    # a lock heartbeat of inf/6 s crashed its thread (OverflowError), leaving the lock to go stale
    for huge in (float("inf"), 1e300):
        with pytest.raises(ConfigError, match="lock_stale_seconds: Input should be less"):
            parse_config({**BASE, "output": {**BASE["output"], "lock_stale_seconds": huge}})
    # "" became the config's own folder: a cache written beside it, a folder as checkpoint
    for section, key in (
        ("inference", "cache_dir"),
        ("model", "checkpoint"),
        ("output", "png_dir"),
        ("output", "store"),
        ("data", "source"),
    ):
        values = {k: dict(v) for k, v in BASE.items()}
        values.setdefault(section, {})[key] = " "
        with pytest.raises(ConfigError, match=rf"{section}(: |\.){key}: is empty; give a"):
            parse_config(values)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    # YAML keeps the last value: a second `attention:` pasted at the end would silently drop
    # the first section's keys.
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(BASE) + "attention:\n  layers: [0]\n  full: true\n")
    path.write_text(path.read_text() + "attention:\n  layers: [1]\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: key 'attention' is given twice \(lines"):
        load_config(path)
    path.write_text(yaml.safe_dump(BASE) + "inference:\n  batch_size: 8\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match="key 'batch_size' is given twice"):
        load_config(path)
    with pytest.raises(ConfigError, match="given twice"):
        load_config(write(tmp_path, BASE), ["attention={layers: [0], layers: [1]}"])
    # Keys merged with `<<: *anchor` may still be overridden, as YAML intends.
    path.write_text(
        "defaults: &d {batch_size: 8, threads: 1}\n"
        + yaml.safe_dump(BASE)
        + "inference:\n  <<: *d\n  batch_size: 16\n"
    )
    with pytest.raises(ConfigError, match="defaults: unknown key"):
        load_config(path)  # the anchor's holder is not a config section, and says so


def test_an_override_without_a_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--set 'output.store=': no value after '='"):
        load_config(write(tmp_path, BASE), ["output.store="])
    cfg = load_config(write(tmp_path, BASE), ["output.png_dir=null"])  # unsetting still works
    assert cfg.output.png_dir is None


def test_a_merge_key_may_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    body = yaml.safe_dump(BASE).replace("model:", "model: &m")
    path.write_text(body + "inference: {<<: {batch_size: 8, threads: 1}, batch_size: 16}\n")
    cfg = load_config(path)
    assert cfg.inference.batch_size == 16 and cfg.inference.threads == 1


def test_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(
        write(tmp_path, {**BASE, "data": {"source": "~/images"}, "output": {"store": "~/r.zarr"}})
    )
    assert Path(cfg.data.source) == tmp_path / "home" / "images"
    assert cfg.output.store == tmp_path / "home" / "r.zarr"


def test_a_config_on_standard_input_or_behind_a_url(tmp_path, monkeypatch):
    import io
    import sys

    monkeypatch.chdir(tmp_path)
    text = yaml.safe_dump(BASE).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text)))
    cfg = load_config("-")
    assert Path(cfg.data.source) == tmp_path / "images"  # relative to the current folder
    with pytest.raises(ConfigError, match=r"config http://127.0.0.1:9/x.yaml: a config is a local"):
        load_config("http://127.0.0.1:9/x.yaml")  # the URL named as given, not mangled


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"checkpoint_path": "w.pth"}, "checkpoint_path"),
        ({"pretrained_cfg_overlay": {"file": "w.safetensors"}}, r"pretrained_cfg_overlay\.file"),
        ({"pretrained_cfg": {"file": "w.safetensors"}}, r"pretrained_cfg\.file"),
        ({"cache_dir": "hub"}, "cache_dir"),
    ],
)
def test_weights_from_a_file_named_in_kwargs_are_refused(tmp_path, kwargs, key):
    # Only model.checkpoint is known by its content: a file given through timm's own
    # arguments, changed, would be served the graph (and the store fingerprint) of the old.
    model = {**BASE["model"], "kwargs": kwargs}
    with pytest.raises(ConfigError, match=rf"model\.kwargs\.{key}: .*go in model\.checkpoint"):
        load_config(write(tmp_path, {**BASE, "model": model}))
    # The hub's own names stay allowed: they are part of the key as written.
    model = {**BASE["model"], "kwargs": {"pretrained_cfg_overlay": {"hf_hub_id": "org/x"}}}
    load_config(write(tmp_path, {**BASE, "model": model}))


@pytest.mark.parametrize("key", ["connect_timeout", "stall_minutes"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_cluster_times_are_finite(tmp_path, key, value):
    # --set cluster.connect_timeout=.inf reached distributed as "infs": a KeyError traceback.
    with pytest.raises(ConfigError, match=rf"cluster\.{key}"):
        load_config(write(tmp_path, {**BASE, "cluster": {key: value}}))
