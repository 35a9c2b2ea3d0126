"""ONNX export: a merged Hugging Face folder -> a decoder-with-KV-cache graph -> (8-bit weight-only).

The graph comes from onnxruntime-genai's model builder when it is installed (the `export` extra pins it): one
GroupQueryAttention (rotary inside), SkipSimplifiedLayerNormalization and MatMul per block, about 400 nodes for
SmolLM2 against several thousand in optimum's graph, whose per-node overhead dominated one-token decoding (83 vs
130 tok/s measured side by side, 8-bit, 2 cores). Only the builder's graph is used; it runs on plain onnxruntime
with the same inputs and outputs. Without the builder, or for an architecture it does not know, optimum exports.

Two changes are made to optimum's graph, both checked by the parity gate:
- the LM head runs on the last position only. The loop never needs the logits of earlier positions, and over a
  900-token prompt the full-sequence head would cost as much as the rest of the prefill and return 180 MB;
- `--quant int8` stores every MatMul weight as 8-bit blocks (onnxruntime's MatMulNBits, blocks of 16 with a zero
  point each: on the demo dev split's real prompts, symmetric blocks of 32 agreed with torch on 0.90 of the greedy
  next tokens, symmetric 16 on 0.94, these on 0.96; the gate is 0.95). The LM head alone keeps symmetric blocks
  of 32 (no parity cost, faster).
  The kernel runs at accuracy level 4 (activations quantized per block inside the kernel, the fast CPU path;
  float compute generated at 6 tok/s). onnxruntime's `quantize_dynamic` broke greedy parity on models this small
  (26/50 measured); this keeps it, and every export measures it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

from mmhops_lite.backends.onnx_backend import KV_LAYOUT_KEY, KV_SHARED, ONNX_FILE
from mmhops_lite.errors import InputError, MmhopsError, require
from mmhops_lite.safeio import temp_name

ONNX_QUANTS = ("fp32", "int8")
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations in the kernel (the fast CPU path); 0 = float compute
KEEP_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


GRAPHS = ("auto", "fused", "optimum")


def fused_builder_available() -> bool:
    """Is onnxruntime-genai's model builder importable (without importing its runtime)?"""
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


INT8_BLOCK, INT8_SYMMETRIC = 16, False


def export_onnx(hf_dir: Path, out: Path, quant: str = "fp32", block_size: int = INT8_BLOCK,
                graph: str = "auto") -> Path:
    """Export a merged HF causal-LM folder to `out/` (model.onnx + tokenizer/config files); atomic.

    `graph`: "fused" (onnxruntime-genai's builder), "optimum", or "auto" (fused when the builder is installed and
    knows the architecture, else optimum)."""
    if quant not in ONNX_QUANTS:
        raise InputError(f"unknown ONNX quantization '{quant}'", fix=f"use one of: {', '.join(ONNX_QUANTS)}")
    if graph not in GRAPHS:
        raise InputError(f"unknown ONNX graph '{graph}'", fix=f"use one of: {', '.join(GRAPHS)}")
    onnx = require("onnx", "export")
    if graph in ("auto", "fused") and fused_builder_available():
        try:
            return _export_fused(onnx, Path(hf_dir), Path(out), quant, block_size)
        except MmhopsError as exc:
            if graph == "fused":
                raise
            logging.getLogger("mmhops_lite").warning("fused ONNX graph failed, exporting with optimum: %s", exc)
    elif graph == "fused":
        raise MmhopsError("onnxruntime-genai's model builder is not installed", fix="pip install -e '.[export]'")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise MmhopsError("optimum's ONNX exporter is not installed", fix="pip install -e '.[export]' "
                          "(optimum 2.1 + optimum-onnx 0.1.0), or rerun bash scripts/setup.sh") from exc
    out = Path(out)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    raw = tmp / "raw"
    chatter = io.StringIO()  # the tracer's warnings and optimum's notes are for optimum's developers, not ours
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            main_export(str(hf_dir), str(raw), task="text-generation-with-past", device="cpu", do_validation=False,
                        local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - optimum/torch.onnx raise many types; the message is what matters
        shutil.rmtree(tmp, ignore_errors=True)
        tail = chatter.getvalue().strip().splitlines()[-5:]
        raise MmhopsError(f"optimum could not export {hf_dir} to ONNX: {exc}" + ("\n" + "\n".join(tail) if tail else ""),
                          path=hf_dir, fix="check the architecture is one optimum supports (llama, qwen2, ...)") from exc
    model = onnx.load(str(raw / ONNX_FILE), load_external_data=True)
    last_position_logits(model)
    if quant == "int8":
        model = weight_only_int8(model, block_size)
    return _publish(onnx, model, raw, tmp, out)


def _export_fused(onnx, hf_dir: Path, out: Path, quant: str, block_size: int) -> Path:
    """The builder's fp32 graph (last-position logits), then the same 8-bit weight-only quantization."""
    import subprocess
    import sys

    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    raw, cache = tmp / "raw", tmp / "cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(raw), "-p", "fp32",
           "-e", "cpu", "-c", str(cache), "--extra_options", "prune_lm_head=true"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if res.returncode != 0 or not (raw / ONNX_FILE).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-4:])
        raise MmhopsError(f"onnxruntime-genai's builder could not build {hf_dir}: {tail}", path=hf_dir,
                          fix="export with optimum's graph instead: MMHOPS_ONNX_GRAPH=optimum mmhops-lite export --onnx")
    model = onnx.load(str(raw / ONNX_FILE), load_external_data=True)
    if quant == "int8":
        model = weight_only_int8(model, block_size)
    if any(n.op_type == "GroupQueryAttention" for n in model.graph.node):  # the backend may update the cache in place
        entry = model.metadata_props.add()
        entry.key, entry.value = KV_LAYOUT_KEY, KV_SHARED
    return _publish(onnx, model, hf_dir, tmp, out)  # the merged folder's tokenizer and configs: the torch backend's


def _publish(onnx, model, files_from: Path, tmp: Path, out: Path) -> Path:
    """Save `model` with the KEEP_FILES found in `files_from` into `tmp/final`, then move it to `out` whole."""
    final = tmp / "final"
    final.mkdir()
    _save(onnx, model, final / ONNX_FILE)
    for name in KEEP_FILES:
        if (files_from / name).is_file():
            shutil.copyfile(files_from / name, final / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(final, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def last_position_logits(model) -> None:
    """Make the graph compute `logits` for the last position only (a Slice before the LM head's MatMul)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None or head.op_type != "MatMul":
        raise MmhopsError("the exported graph has no MatMul producing `logits`; cannot trim it to the last position",
                          fix="export a causal LM whose head is a plain MatMul (llama, qwen2 and most decoders)")
    hidden = head.input[0]
    consts = {"mmhops_last_start": -1, "mmhops_last_end": np.iinfo(np.int64).max, "mmhops_last_axis": 1}
    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.asarray([value], dtype=np.int64), name))
    graph.node.insert(list(graph.node).index(head), helper.make_node(
        "Slice", [hidden, "mmhops_last_start", "mmhops_last_end", "mmhops_last_axis"], ["mmhops_last_hidden"],
        name="mmhops_last_position"))
    head.input[0] = "mmhops_last_hidden"
    for vi in graph.output:
        if vi.name == "logits" and vi.type.tensor_type.HasField("shape"):
            dim = vi.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = 1


def weight_only_int8(model, block_size: int = INT8_BLOCK, symmetric: bool = INT8_SYMMETRIC):
    """Every MatMul with a constant weight as 8-bit blocks (MatMulNBits, accuracy level 4).

    The LM head (the MatMul producing `logits`, a fifth of SmolLM2's weights and the largest read of every step) is
    stored as symmetric blocks of 32 instead: measured, its precision did not move greedy parity (0.96 either way
    on the demo dev split), and the coarser blocks decode ~5% faster."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise MmhopsError("onnxruntime's weight-only quantizer needs onnx-ir", fix="pip install -e '.[export]'") from exc
    _fold_transposed_weights(model)
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, qlog.level = qlog.level, logging.WARNING  # it logs a line per MatMul at INFO
    try:
        q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=head)
        q.process()
        model = q.model.model
        if head:  # the MatMuls left in float are the head's
            q = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
            q.process()
            model = q.model.model
    finally:
        qlog.setLevel(level)
    return model


def _fold_transposed_weights(model) -> None:
    """Turn `MatMul(x, Transpose(W))` with W an initializer into `MatMul(x, W^T)` with W^T stored.

    optimum ties the LM head to the embedding this way; the quantizer only sees constant weights, so without this
    the head (a fifth of SmolLM2's weights, the largest MatMul of every step) would stay in float.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        tr = producers.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[tr.input[0]])
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = tr.output[0] + "_folded"
        if name not in inits:
            t = numpy_helper.from_array(w.T.copy(), name)
            graph.initializer.append(t)
            inits[name] = t
        node.input[1] = name
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]
    for n in dead:
        graph.node.remove(n)


def _save(onnx, model, path: Path) -> None:
    """Save in one file when it fits protobuf's 2 GB, else with the weights beside it."""
    if model.ByteSize() < (2 << 30) - (64 << 20):
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")


def build_onnx(job) -> dict[str, Path]:
    """policy-onnx/: the merged policy as a decoder with KV cache, fp32 or 8-bit block weights (job.quant)."""
    merged = job.merged()
    graph = os.environ.get("MMHOPS_ONNX_GRAPH", "auto")  # auto | fused | optimum
    fused = graph != "optimum" and fused_builder_available()
    job.say(f"exporting to ONNX ({job.quant}) with {'a fused graph (onnxruntime-genai builder)' if fused else 'optimum'}")
    export_onnx(merged, job.work / "policy-onnx", job.quant, graph=graph)
    return {f"policy-onnx/{f.name}": f for f in sorted((job.work / "policy-onnx").iterdir())}
