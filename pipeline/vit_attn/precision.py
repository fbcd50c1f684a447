"""Mixed precision for exported graphs: fp16 weights and matmuls, fp32 where accuracy lives.

The generic converters (onnxconverter_common, onnxruntime.transformers.float16) produced
invalid graphs on torch's dynamo exports here (stale value_info types; duplicate cast names
for shared initializers), so this is a small explicit pass: every node keeps a precision,
and a Cast is inserted only where a tensor crosses between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError

HALF_MAX = float(np.finfo(np.float16).max)


def _to_half(name: str, values: np.ndarray) -> np.ndarray:
    """A weight in float16; one beyond its range would be inf and every map NaN: refused."""
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > HALF_MAX:
        raise ExportError(
            f"precision: mixed: weight {name} reaches {peak:.3g}, beyond float16's range "
            f"({HALF_MAX:.0f}); use precision: fp32 for this model"
        )
    return values.astype(np.float16)


FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

# Softmax and layer norms stay fp32: their reductions lose the most in fp16, and the
# attention probabilities are the product.
FP32_OPS = frozenset(
    {"Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "TopK"}
)


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """The torch module path of a node, from the dynamo exporter's metadata (empty if absent)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                import ast

                return [str(s) for s in ast.literal_eval(prop.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def to_mixed(
    model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool]
) -> onnx.ModelProto:
    """Convert float tensors to fp16 except in nodes `keep_fp32` selects; graph I/O stays fp32."""
    graph = model.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        raise ExportError("mixed precision: graphs with control flow (If/Loop) are not supported")
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    for vi in [*graph.input, *graph.output]:
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in graph.initializer}
    for name, t in inits.items():
        elem[name] = t.data_type

    precision: dict[str, int] = {n: FLOAT for n, e in elem.items() if e == FLOAT}
    cast_cache: dict[tuple[str, int], str] = {}
    new_inits: list[TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    output_names = {o.name for o in graph.output}

    def as_type(name: str, want: int) -> str:
        if elem.get(name) != FLOAT or precision.get(name, FLOAT) == want:
            return name
        key = (name, want)
        if key not in cast_cache:
            tag = "fp16" if want == HALF else "fp32"
            new = f"{name}__{tag}"
            if name in inits and want == HALF:
                arr = _to_half(name, numpy_helper.to_array(inits[name]))
                new_inits.append(numpy_helper.from_array(arr, new))
            else:
                new_nodes.append(
                    helper.make_node("Cast", [name], [new], to=want, name=f"cast_{new}")
                )
            precision[new] = want
            elem[new] = FLOAT
            cast_cache[key] = new
        return cast_cache[key]

    for node in graph.node:
        want = FLOAT if keep_fp32(node) else HALF
        inputs = [as_type(i, want) if i else i for i in node.input]
        outputs = list(node.output)
        if want == HALF:
            for k, out in enumerate(outputs):
                if elem.get(out) != FLOAT:
                    continue
                if out in output_names:
                    outputs[k] = f"{out}__fp16"
                    elem[outputs[k]] = FLOAT
                precision[outputs[k]] = HALF
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend(inputs)
        del new.output[:]
        new.output.extend(outputs)
        if want == HALF:
            _retype_attributes(new)
        new_nodes.append(new)
        for orig, out in zip(node.output, outputs):
            if orig != out:
                new_nodes.append(
                    helper.make_node("Cast", [out], [orig], to=FLOAT, name=f"cast_{orig}")
                )

    used = {i for n in new_nodes for i in n.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [t for t in new_inits if t.name in used])
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def _retype_attributes(node: onnx.NodeProto) -> None:
    # Ops whose output type is an attribute must follow the node into fp16.
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = HALF
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            arr = numpy_helper.to_array(attr.t).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))


def scope_selector(
    model_prefix: str, fp32_modules: Iterable[str]
) -> Callable[[onnx.NodeProto], bool]:
    """Keep fp32: FP32_OPS, anything outside the model (post-processing), and named submodules."""
    fp32_prefixes = tuple(f"{model_prefix}.{m}" for m in fp32_modules)

    def keep(node: onnx.NodeProto) -> bool:
        if node.op_type in FP32_OPS:
            return True
        scopes = node_scopes(node)
        # torch 2.14 writes full module paths (`vit.blocks.0.attn`), earlier versions the
        # top module alone (`vit`) as the second scope: accept both.
        if not any(s == model_prefix or s.startswith(model_prefix + ".") for s in scopes[1:2]):
            return True
        return any(s == p or s.startswith(p + ".") for s in scopes for p in fp32_prefixes)

    return keep
