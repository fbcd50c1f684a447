"""The Docker images agree with pyproject.toml: same Python, same pins, CUDA matching onnxruntime-gpu.

Docker cannot build here, so the Dockerfiles are read with a real parser (dockerfile-parse)
and their install commands with shlex and `packaging`; nothing is matched with regexes alone.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import io
import json
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

dockerfile_parse = pytest.importorskip(
    "dockerfile_parse", reason="dockerfile-parse is a dev dependency: pip install -e '.[dev]'"
)

REPO = Path(__file__).resolve().parents[1]
GPU, CPU = REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ORT_NAMES = ("onnxruntime-gpu", "onnxruntime")


def cuda_major_for(ort: Version) -> int:
    """The CUDA major onnxruntime-gpu's PyPI wheels are built for (1.27+: CUDA 13; docs/RUNNING.md)."""
    return 13 if ort >= Version("1.27") else 12


@dataclass
class Image:
    path: Path
    parser: object

    @property
    def structure(self) -> list[dict]:
        return self.parser.structure

    def instructions(self, name: str) -> list[str]:
        return [i["value"] for i in self.structure if i["instruction"] == name]

    @property
    def final_stage(self) -> list[dict]:
        froms = [n for n, i in enumerate(self.structure) if i["instruction"] == "FROM"]
        return self.structure[froms[-1] :]

    def final(self, name: str) -> list[str]:
        return [i["value"] for i in self.final_stage if i["instruction"] == name]

    @property
    def args(self) -> dict[str, str]:
        return self.parser.args

    def install_command(self) -> list[str]:
        """The tokens of the one `pip install` / `uv pip install` command that installs the package."""
        found = []
        for run in self.final("RUN"):
            tokens = shlex.split(run, comments=False)
            commands, current = [], []
            for t in tokens:
                if t in ("&&", "||", ";"):
                    commands.append(current)
                    current = []
                else:
                    current.append(t)
            commands.append(current)
            for cmd in commands:
                if "pip" in cmd and "install" in cmd[cmd.index("pip") :]:
                    found.append(cmd)
        assert len(found) == 1, f"{self.path.name}: expected one pip install command, found {found}"
        return found[0]

    def substitute(self, text: str) -> str:
        for key, value in self.args.items():
            text = text.replace("${" + key + "}", value).replace("$" + key, value)
        return text


def load(path: Path) -> Image:
    # The parser re-reads its file object on every property: hand it an in-memory copy.
    return Image(path, dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes())))


@pytest.fixture(scope="module", params=[GPU, CPU], ids=["gpu", "cpu"])
def image(request) -> Image:
    return load(request.param)


def project_requirements() -> dict[str, Requirement]:
    return {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}


def image_python(img: Image) -> Version:
    if "PYTHON_VERSION" in img.args:
        return Version(img.args["PYTHON_VERSION"])
    base = img.final("FROM")[0].split()[0]
    name, _, tag = base.partition(":")
    assert name in ("python", "docker.io/library/python"), base
    return Version(tag.split("-")[0])


def test_both_images_use_the_minimum_supported_python():
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    floor = min(Version(s.version) for s in spec if s.operator in (">=", "=="))
    versions = {p.name: image_python(load(p)) for p in (GPU, CPU)}
    for name, v in versions.items():
        assert v in spec, f"{name}: Python {v} outside requires-python {spec}"
        assert v.release[:2] == floor.release[:2], (
            f"{name}: Python {v}, but the project is tested on {floor}"
        )
    assert len({v.release[:2] for v in versions.values()}) == 1, versions


def test_onnxruntime_pin_is_one_version_within_pyproject():
    pins = {p.name: Version(load(p).args["ONNXRUNTIME_VERSION"]) for p in (GPU, CPU)}
    assert len(set(pins.values())) == 1, pins
    reqs = project_requirements()
    for name in ORT_NAMES:
        assert next(iter(pins.values())) in reqs[name].specifier, (name, reqs[name].specifier)


def test_install_uses_the_project_constraints_and_package(image):
    cmd = image.install_command()
    constraints = [cmd[i + 1] for i, t in enumerate(cmd) if t in ("-c", "--constraint")]
    assert constraints, f"{image.path.name}: install without constraints.txt: {cmd}"
    copied = {}
    for value in image.final("COPY"):
        parts = shlex.split(value)
        if any(p.startswith("--from") for p in parts):
            continue
        *sources, dest = parts
        for src in sources:
            assert (REPO / src).exists(), (
                f"{image.path.name} copies {src}, which is not in the repository"
            )
            copied[src] = dest
    assert (
        copied.get("constraints.txt")
        and constraints[0] == copied["constraints.txt"].rstrip("/") + "/constraints.txt"
    )
    assert "pyproject.toml" in copied and "pipeline" in copied
    src = copied["pyproject.toml"].rstrip("/")
    package = [t for t in cmd if t == src or t.startswith(src + "[")]  # the folder, with extras
    assert len(package) == 1, cmd
    extras = Requirement("pkg" + package[0][len(src) :]).extras
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    # onnxruntime pinned to the ARG, with pyproject's own platform markers (when given).
    project = project_requirements()
    ort = [
        Requirement(image.substitute(t))
        for t in cmd
        if t.split("=")[0].split(";")[0].strip() in ORT_NAMES
    ]
    assert ort, cmd
    for req in ort:
        assert str(req.specifier) == f"=={image.args['ONNXRUNTIME_VERSION']}", req
        if req.marker is not None:
            assert str(req.marker) == str(project[req.name].marker), (req, project[req.name])


def test_constraints_pins_reach_the_image():
    """torch/torchvision are pinned only in constraints.txt, which both images install with."""
    pins = [
        Requirement(line)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert {p.name for p in pins} >= {"torch", "torchvision"}
    for path in (GPU, CPU):
        for p in pins:
            assert p.name not in " ".join(load(path).install_command()), (
                f"{path.name} pins {p.name} apart from constraints.txt"
            )


def test_gpu_base_matches_onnxruntime_cuda_and_cudnn():
    img = load(GPU)
    base = img.final("FROM")[0].split()[0]
    name, _, tag = base.partition(":")
    assert name == "nvidia/cuda", base
    cuda = Version(tag.split("-")[0])
    flavours = tag.split("-")[1:]
    assert "cudnn" in flavours or any(f.startswith("cudnn9") for f in flavours), (
        f"{base} has no cuDNN"
    )
    assert "runtime" in flavours, f"{base}: use a runtime image"
    ort = Version(img.args["ONNXRUNTIME_VERSION"])
    assert cuda.major == cuda_major_for(ort), (
        f"onnxruntime-gpu {ort} needs CUDA {cuda_major_for(ort)}, base has {cuda}"
    )
    # Where the pinned wheel is the one installed here, its own metadata says the same.
    try:
        installed = Version(importlib.metadata.version("onnxruntime-gpu"))
    except importlib.metadata.PackageNotFoundError:
        return
    if installed == ort:
        reqs = [Requirement(r) for r in importlib.metadata.requires("onnxruntime-gpu") or []]
        runtime = next(r for r in reqs if r.name == "nvidia-cuda-runtime")
        assert Version(f"{cuda.major}.0") in runtime.specifier, runtime
        cudnn = next(r for r in reqs if r.name.startswith("nvidia-cudnn"))
        assert cudnn.name.endswith(f"cu{cuda.major}") and Version("9.0") in cudnn.specifier, cudnn


def test_entry_point_user_and_volumes(image):
    scripts = PYPROJECT["project"]["scripts"]
    entry = json.loads(image.final("ENTRYPOINT")[-1])
    assert entry == ["vit-attn"] and "vit-attn" in scripts
    user = image.final("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), f"{image.path.name} runs as {user}"
    volumes = set(json.loads(image.final("VOLUME")[-1]))
    assert {"/data", "/out"} <= volumes
    cache = image.parser.envs.get("VIT_ATTN_CACHE")
    assert cache in volumes, "the export cache should outlive the container"


def test_dockerignore_admits_what_the_image_copies(image):
    """BuildKit reads <Dockerfile>.dockerignore; everything COPY names must pass it."""
    ignore = image.path.with_name(image.path.name + ".dockerignore")
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if (
                fnmatch.fnmatch(path, pat)
                or fnmatch.fnmatch(path, pat + "/*")
                or path.startswith(pat + "/")
            ):
                keep = neg
        return keep

    for value in image.final("COPY"):
        parts = shlex.split(value)
        if any(p.startswith("--from") for p in parts):
            continue
        for src in parts[:-1]:
            files = (
                [src]
                if (REPO / src).is_file()
                else [
                    str(p.relative_to(REPO))
                    for p in (REPO / src).rglob("*.py")
                    if "__pycache__" not in p.parts
                ]
            )
            assert files and all(included(f) for f in files), (
                src,
                [f for f in files if not included(f)],
            )
    assert not included(".venv/bin/python") and not included("tests/test_docker.py")
