"""Config validation: errors name the key and the file; overrides keep YAML types."""

from __future__ import annotations

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
    with pytest.raises(ConfigError, match=r"attention\.nope: unknown key"):
        load_config(write(tmp_path, BASE), ["attention.nope=1"])


def test_conflicts_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="either"):
        parse_config({**BASE, "model": {"name": "x", "pretrained": True, "checkpoint": "w.pth"}})
    with pytest.raises(ConfigError, match="cluster.address"):
        parse_config({**BASE, "cluster": {"kind": "address"}})
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
