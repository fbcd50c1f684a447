"""Model loading, checkpoints, the export cache and backend selection."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vit_attn import export as export_mod
from vit_attn.errors import BackendError, CheckpointError, ModelError
from vit_attn.export import OutputSpec, export_onnx
from vit_attn.model import ModelSource, load_model
from vit_attn.runtime import OrtRunner, RuntimeOptions

TINY = {"depth": 2}


def small(seed: int = 0, **kw) -> ModelSource:
    return ModelSource("vit_tiny_patch16_224", seed=seed, kwargs={**TINY, **kw})


def cls_map(loaded, x: torch.Tensor) -> np.ndarray:
    from vit_attn.export import AttentionGraph
    from vit_attn.runtime import TorchRunner

    runner = TorchRunner(AttentionGraph(loaded, OutputSpec(layers=(1,))), RuntimeOptions())
    return runner.run(x.numpy())["cls_attention"]


@pytest.mark.parametrize("fmt", ["safetensors", "pth-nested", "pt-plain"])
def test_checkpoint_round_trip(tmp_path, fmt):
    source = load_model(small(seed=7))
    state = source.model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pth-nested":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "w.pt"
        torch.save(state, path)
    loaded = load_model(ModelSource("vit_tiny_patch16_224", checkpoint=path, seed=99, kwargs=TINY))
    assert (
        loaded.weights.startswith("checkpoint:") and len(loaded.weights) == len("checkpoint:") + 64
    )
    x = torch.randn(2, 3, 224, 224)
    np.testing.assert_array_equal(cls_map(loaded, x), cls_map(source, x))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.model(x).numpy(), source.model(x).numpy())


def test_checkpoint_resampled_to_another_input_size(tmp_path):
    source = load_model(small(seed=1))
    path = tmp_path / "w.safetensors"
    save_file(source.model.state_dict(), str(path))
    loaded = load_model(
        ModelSource("vit_tiny_patch16_224", checkpoint=path, img_size=(128, 192), kwargs=TINY)
    )
    assert loaded.layout.grid == (8, 12)
    assert loaded.model.pos_embed.shape[1] == 1 + 8 * 12


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    source = load_model(small())
    path = tmp_path / "w.safetensors"
    save_file(source.model.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(ModelSource("vit_tiny_patch16_224", checkpoint=path, kwargs=TINY))
    pth = tmp_path / "w.pth"
    torch.save(source.model.state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="w.pth"):
        load_model(ModelSource("vit_tiny_patch16_224", checkpoint=pth, kwargs=TINY))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    other = load_model(ModelSource("deit_tiny_distilled_patch16_224", kwargs=TINY))
    path = tmp_path / "deit.safetensors"
    save_file(other.model.state_dict(), str(path))
    with pytest.raises(CheckpointError, match="does not (match|fit)"):
        load_model(ModelSource("vit_tiny_patch16_224", checkpoint=path, kwargs=TINY))


def test_a_checkpoint_mismatch_names_the_keys(tmp_path):
    # torch's message lists the keys after its first line; the one-line error must name them.
    state = load_model(small()).model.state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["head.bias"]
    state["norm.weight"] = torch.ones(7)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_model(ModelSource("vit_tiny_patch16_224", checkpoint=path, kwargs=TINY))
    message = str(err.value)
    assert "1 missing (head.bias)" in message and "1 unexpected (extra.weight)" in message
    assert "norm.weight (7,) vs (192,)" in message and "\n" not in message
    # One that timm's resampling filter trips over said only "tuple index out of range".
    save_file({"pos_embed": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_model(ModelSource("vit_tiny_patch16_224", checkpoint=path, kwargs=TINY))
    message = str(err.value)
    assert "does not fit this model: " in message and "missing (" in message, message
    assert "pos_embed (3,) vs (1, " in message and "tuple index" not in message, message


def test_pickled_code_in_a_checkpoint_is_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').close()",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_model(ModelSource("vit_tiny_patch16_224", checkpoint=path, kwargs=TINY))
    assert not (tmp_path / "pwned").exists()


def test_missing_checkpoint_and_unknown_or_attentionless_models():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(ModelSource("vit_tiny_patch16_224", checkpoint="nope.safetensors"))
    with pytest.raises(ModelError, match="not a timm model"):
        load_model(ModelSource("vit_does_not_exist"))
    with pytest.raises(ModelError, match="no transformer blocks"):
        load_model(ModelSource("resnet18"))


@pytest.mark.parametrize(
    "kwargs, cause",
    [
        ({"depth": 1, "num_heads": 5}, "rejects"),  # timm's own assertion
        ({"depth": 1, "patch_size": 0}, "ZeroDivisionError"),
        ({"depth": 1, "act_layer": "nope"}, "KeyError"),
    ],
)
def test_model_kwargs_timm_cannot_build_with_are_one_line(kwargs, cause):
    with pytest.raises(ModelError, match="model.kwargs") as caught:
        load_model(ModelSource("vit_tiny_patch16_224", kwargs=kwargs))
    assert cause in str(caught.value) and "\n" not in str(caught.value)


def test_layer_selection():
    layout = load_model(small()).layout
    assert layout.resolve_layers("all") == (0, 1)
    assert layout.resolve_layers([-1, 0, 1]) == (0, 1)
    assert layout.resolve_layers(-2) == (0,)
    for bad in ([2], [-3], [], "last", [1.5]):
        with pytest.raises(ModelError, match="attention.layers"):
            layout.resolve_layers(bad)


def test_seeded_random_init_is_reproducible():
    a, b, c = load_model(small(seed=3)), load_model(small(seed=3)), load_model(small(seed=4))
    assert a.weights == "random:3"
    assert export_mod.weights_digest(a.model) == export_mod.weights_digest(b.model)
    assert export_mod.weights_digest(a.model) != export_mod.weights_digest(c.model)


@pytest.mark.slow  # several exports
def test_export_cache_hit_and_invalidation(export_cache, monkeypatch):
    loaded = load_model(small(seed=11))
    spec = OutputSpec(layers=(1,))
    first = export_onnx(loaded, spec, "fp32", export_cache)
    calls = []
    real_export = export_mod._export
    monkeypatch.setattr(export_mod, "_export", lambda *a: (calls.append(a), real_export(*a)))
    again = export_onnx(load_model(small(seed=11)), spec, "fp32", export_cache)
    assert again == first and calls == []
    other_layers = export_onnx(loaded, OutputSpec(layers=(0, 1)), "fp32", export_cache)
    other_precision = export_onnx(loaded, spec, "mixed", export_cache)
    other_weights = export_onnx(load_model(small(seed=12)), spec, "fp32", export_cache)
    assert len({first, other_layers, other_precision, other_weights}) == 4
    assert len(calls) == 3
    assert not list(first.parent.glob("tmp*"))  # no temporary files left behind


def test_cuda_requested_without_cuda_is_refused_or_falls_back(export_cache):
    path = export_onnx(load_model(small(seed=11)), OutputSpec(layers=(1,)), "fp32", export_cache)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="CUDA execution provider did not load"):
        OrtRunner(path, RuntimeOptions(device="cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = OrtRunner(path, RuntimeOptions(device="cuda", allow_cpu_fallback=True))
    assert runner.providers == ["CPUExecutionProvider"]
    assert any("allow_cpu_fallback" in str(w.message) for w in caught)
    out = runner.run(np.zeros((1, 3, 224, 224), np.float32))
    assert out["cls_attention"].shape == (1, 1, 3, 14, 14)
    # TensorRT asked on the CPU: said, not silently dropped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OrtRunner(path, RuntimeOptions(device="cpu", tensorrt=True))
    assert any("TensorRT runs on CUDA devices only" in str(w.message) for w in caught)


def test_the_torch_backend_falls_back_to_the_cpu_as_onnxruntime_does():
    # allow_cpu_fallback was ignored by the torch backend: the run stopped.
    from vit_attn.export import AttentionGraph
    from vit_attn.runtime import TorchRunner

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    loaded = load_model(small(seed=11))
    graph = AttentionGraph(loaded, OutputSpec(layers=(1,)))
    with pytest.raises(BackendError, match="torch sees no CUDA device"):
        TorchRunner(graph, RuntimeOptions(device="cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = TorchRunner(graph, RuntimeOptions(device="cuda", allow_cpu_fallback=True))
    assert runner.device.type == "cpu"
    assert any("allow_cpu_fallback" in str(w.message) for w in caught)


def test_bad_batch_is_refused(export_cache):
    path = export_onnx(load_model(small(seed=11)), OutputSpec(layers=(1,)), "fp32", export_cache)
    runner = OrtRunner(path, RuntimeOptions(threads=1))
    with pytest.raises(BackendError, match="float32"):
        runner.run(np.zeros((1, 3, 224, 224), np.float64))


def test_pretrained_weights_offline_is_a_clear_error():
    import os
    import subprocess
    import sys

    code = (
        "from vit_attn.model import ModelSource, load_model\n"
        "from vit_attn.errors import ModelError\n"
        "try:\n    load_model(ModelSource('vit_tiny_patch16_224', pretrained=True))\n"
        "except ModelError as e:\n    print('ModelError:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": os.devnull + "-none"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert (
        "ModelError: pretrained weights for 'vit_tiny_patch16_224' could not be loaded"
        in out.stdout
    ), out.stderr


def _load_in_child(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import torch\n"
        "from vit_attn.model import ModelSource, load_model\n"
        "from vit_attn.errors import ModelError\n"
        "try:\n"
        "    m = load_model(ModelSource('vit_tiny_patch16_224', pretrained=True)).model\n"
        "    print('LOADED', float(m.pos_embed.double().sum()))\n"
        "except ModelError as e:\n    print('ModelError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_an_unreachable_hub_is_said_without_the_hubs_retries(tmp_path):
    # huggingface_hub retried each of timm's two files five times (~50 s of silence) before
    # "cannot find the requested files in the local cache". One connection tells it now.
    from .s3server import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused
    out = _load_in_child({"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint})
    said = out.stdout.strip()
    assert said.startswith(
        "ModelError: pretrained weights for 'vit_tiny_patch16_224' are not in the Hugging Face "
        f"cache and the hub is not reachable ({endpoint} unreachable: "
    ), (said, out.stderr[-2000:])
    assert "Retrying in" not in out.stderr, out.stderr[-2000:]


def test_weights_in_the_hugging_face_cache_load_when_the_hub_is_unreachable(tmp_path):
    # The same unreachable hub, with the weights in the cache: they load, the ones written.
    import timm

    from .s3server import free_port

    torch.manual_seed(3)
    weights = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    repo = tmp_path / "hf" / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(weights, str(repo / "snapshots" / commit / "model.safetensors"))
    out = _load_in_child(
        {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    )
    expected = float(weights["pos_embed"].double().sum())
    assert out.stdout.split() == ["LOADED", repr(expected)], (out.stdout, out.stderr[-2000:])


def test_a_negative_class_count_is_a_model_without_classifier():
    # timm makes an Identity head for num_classes <= 0; the layout kept -5, and planning
    # failed with "invalid store spec: topk must be None or >= 1, got -5".
    loaded = load_model(
        ModelSource("vit_tiny_patch16_224", seed=0, img_size=(32, 32), kwargs={"num_classes": -5})
    )
    assert loaded.layout.num_classes == 0
