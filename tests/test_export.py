"""GGUF export on a tiny model built from a config: merged and adapter-only bundles, parity, tampering refused."""
import json

import pytest

from mmhops_lite.bundle import check_bundle
from mmhops_lite.errors import CorruptFile, ParityFailed


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A tiny Llama base and a random (non-zero) LoRA adapter over it, in PEFT format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_models import make_tiny_hf, save_gguf_tokenizer
    from transformers import AutoModelForCausalLM

    from mmhops_lite.registry import resolve

    root = tmp_path_factory.mktemp("exp")
    tok = save_gguf_tokenizer(root / "tok", resolve("smollm2-135m-instruct"))
    base = make_tiny_hf(root / "base", tok, "llama")
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    net.save_pretrained(str(root / "adapter"))
    return base, root / "adapter"


def test_merged_gguf_bundle_passes_parity_and_is_verified(tiny_lora, tmp_path):
    from export.writer import export_bundle, verify_bundle
    from mmhops_lite import api
    from mmhops_lite.config import Config

    base, adapter = tiny_lora
    man = export_bundle("gguf", str(base), str(adapter), tmp_path / "b", quant="f16", prompts=8)
    assert man["parity"]["greedy_top1_agreement"] >= 0.98 and "policy.gguf" in man["files"]
    assert set(man["runtimes"]) >= {"llama-cpp-python", "torch"}
    assert verify_bundle(tmp_path / "b")["ok"]
    # A bundle is a --model for ask/eval: the generator is llama.cpp over the bundle's GGUF.
    gen = api.generator(Config.resolve({"model.policy": str(tmp_path / "b"), "model.threads": 1}, env={}))
    assert gen.id == "policy.gguf"
    # Tampering is refused, naming the file.
    p = tmp_path / "b" / "policy.gguf"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="policy.gguf"):
        check_bundle(tmp_path / "b")
    p.write_bytes(bytes(data[:1000]))
    with pytest.raises(CorruptFile, match="truncated or altered"):
        api.generator(Config.resolve({"model.policy": str(tmp_path / "b")}, env={}))


def test_parity_gate_refuses_a_mismatched_export(tiny_lora, tmp_path, monkeypatch):
    from export import writer

    base, adapter = tiny_lora
    monkeypatch.setattr(writer, "agreement", lambda a, b: 0.5)
    with pytest.raises(ParityFailed, match="below the gate"):
        writer.export_bundle("gguf", str(base), str(adapter), tmp_path / "c", quant="q8_0", prompts=4)
    assert not (tmp_path / "c").exists()
    man = writer.export_bundle("gguf", str(base), str(adapter), tmp_path / "c", quant="q8_0", prompts=4, force=True)
    assert man["parity"]["forced"] is True
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["quant"] == "q8_0"


def test_gguf_bundle_loads_in_stock_llama_cpp(tiny_lora, tmp_path, capfd):
    import llama_cpp

    from export.writer import export_bundle

    base, adapter = tiny_lora
    export_bundle("gguf", str(base), str(adapter), tmp_path / "b", quant="q8_0", prompts=4, force=True)
    assert "llama_model_quantize" not in capfd.readouterr().err  # llama.cpp's per-tensor chatter is kept quiet
    llm = llama_cpp.Llama(model_path=str(tmp_path / "b" / "policy.gguf"), n_ctx=128, verbose=False)
    assert llm.n_vocab() > 1000 and llm.metadata.get("tokenizer.chat_template")


def test_adapter_only_bundle_over_a_gguf_base(tiny_lora, tmp_path):
    """The LoRA alone, as a GGUF adapter over a GGUF base: parity against torch(base + PEFT adapter)."""
    from export.writer import export_bundle, verify_bundle
    from mmhops_lite import api
    from mmhops_lite.config import Config

    base, adapter = tiny_lora
    from mmhops_lite.convert import hf_to_gguf

    base_gguf = hf_to_gguf(base, tmp_path / "base.gguf", "f32")
    man = export_bundle("gguf-adapter", str(base_gguf), str(adapter), tmp_path / "a", prompts=8)
    assert man["kind"] == "gguf-adapter" and set(man["files"]) >= {"adapter.gguf"}
    assert "policy.gguf" not in man["files"] and man["parity"]["greedy_top1_agreement"] >= 0.98
    assert verify_bundle(tmp_path / "a")["ok"]
    gen = api.generator(Config.resolve({"model.policy": str(tmp_path / "a"), "model.threads": 1}, env={}))
    assert gen.id == "base.gguf+adapter.gguf"
    # The adapter is pinned to its base: a different base file is refused.
    data = bytearray(base_gguf.read_bytes())
    data[-10] ^= 0x01
    base_gguf.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="not the one this adapter bundle was made for"):
        api.generator(Config.resolve({"model.policy": str(tmp_path / "a")}, env={}))


def export_onnx_fused_available() -> bool:
    from export.onnx import fused_builder_available

    return fused_builder_available()


@pytest.mark.parametrize("quant,graph", [("fp32", "auto"), ("int8", "auto"), ("int8", "optimum")])
def test_onnx_bundle_parity_stock_session_and_tampering(tiny_lora, tmp_path, quant, graph, monkeypatch):
    """Both graphs: the fused one (onnxruntime-genai's builder, the default where installed) and optimum's."""
    monkeypatch.setenv("MMHOPS_ONNX_GRAPH", graph)
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from export.writer import export_bundle, verify_bundle
    from mmhops_lite import api
    from mmhops_lite.backends.onnx_backend import OnnxGenerator
    from mmhops_lite.config import Config

    base, adapter = tiny_lora
    man = export_bundle("onnx", str(base), str(adapter), tmp_path / "o", quant=quant, prompts=8)
    gate = 0.98 if quant == "fp32" else 0.95
    assert man["kind"] == "onnx" and man["quant"] == quant and man["parity"]["gate"] == gate
    assert man["parity"]["greedy_top1_agreement"] >= gate
    assert "policy-onnx/model.onnx" in man["files"] and "policy-onnx/tokenizer.json" in man["files"]
    assert verify_bundle(tmp_path / "o")["ok"]

    # A stock onnxruntime session runs the graph; its last-position logits match the merged torch model.
    onnx_path = tmp_path / "o" / "policy-onnx" / "model.onnx"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    past = [n for n in names if n.startswith("past_key_values.")]
    shape = sess.get_inputs()[names.index(past[0])].shape
    ids = np.array([[1, 400, 500, 600, 700]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in names:  # optimum's graph; the fused one (GroupQueryAttention) derives positions itself
        feed["position_ids"] = np.arange(5)[None, :]
    feed.update({n: np.zeros((1, shape[1], 0, shape[3]), dtype=np.float32) for n in past})
    logits = sess.run(["logits"], feed)[0]
    assert logits.shape[:2] == (1, 1)  # the head runs on the last position only
    from peft import PeftModel

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).merge_and_unload()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits[0, -1].numpy()
    tol = 1e-3 if quant == "fp32" else 0.05 * float(np.abs(want).max())
    assert np.abs(logits[0, 0] - want).max() < tol
    if quant == "int8":
        import onnx

        g = onnx.load(str(onnx_path)).graph
        inits = {i.name for i in g.initializer}
        fused = any(n.op_type == "GroupQueryAttention" for n in g.node)  # q, k and v packed into one MatMul
        assert fused == (graph == "auto" and export_onnx_fused_available())
        per_layer = 5 if fused else 7
        assert sum(n.op_type == "MatMulNBits" for n in g.node) >= 2 * per_layer + 1  # per layer + the LM head
        assert not [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]  # none left in float

    # ask/eval take the bundle as --model and run it with onnxruntime; the KV cache carries across turns.
    gen = api.generator(Config.resolve({"model.policy": str(tmp_path / "o"), "model.threads": 1}, env={}))
    assert isinstance(gen, OnnxGenerator)
    prompt = gen.render([{"role": "user", "content": "hello"}])
    first = gen.generate(prompt, [], max_tokens=4)
    second = gen.generate(prompt + first.text + " more", [], max_tokens=2)
    assert first.evaluated_tokens == first.prompt_tokens and second.evaluated_tokens < second.prompt_tokens
    # The fused graph updates one KV buffer in place; the same tokens as copying the cache every step, also after
    # the cache is cut back to a shorter prefix.
    assert gen._shared == (graph == "auto" and export_onnx_fused_available())
    if gen._shared:
        plain = api.generator(Config.resolve({"model.policy": str(tmp_path / "o"), "model.threads": 1}, env={}))
        plain._shared = False
        for text in (prompt + first.text + " more and more", prompt + " other"):
            assert gen.generate(text, [], max_tokens=6).text == plain.generate(text, [], max_tokens=6).text

    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="model.onnx"):
        api.generator(Config.resolve({"model.policy": str(tmp_path / "o")}, env={}))


def test_onnx_generator_matches_torch_greedy(tiny_lora, tmp_path):
    """Greedy text from onnxruntime equals torch's for the same merged model, across a KV-reusing second turn."""
    from export.onnx import export_onnx
    from mmhops_lite.backends.onnx_backend import OnnxGenerator
    from mmhops_lite.backends.torch_backend import TorchGenerator

    base, adapter = tiny_lora
    from mmhops_lite.convert import merged_hf

    merged = merged_hf(str(base), str(adapter), tmp_path / "m")
    export_onnx(merged, tmp_path / "x", "fp32")
    onx, ref = OnnxGenerator(tmp_path / "x", threads=1), TorchGenerator(merged, threads=1)
    for gen in (onx, ref):
        gen.reset()
    msgs = [{"role": "user", "content": "Which city is the capital of France?"}]
    a = [onx.generate(onx.render(msgs), [], max_tokens=12).text, ref.generate(ref.render(msgs), [], max_tokens=12).text]
    assert a[0] == a[1]
    b = [g.generate(g.render(msgs) + a[0] + " and", [], max_tokens=6).text for g in (onx, ref)]
    assert b[0] == b[1]


def test_unknown_onnx_quant_is_a_clear_error(tiny_lora, tmp_path):
    from export.writer import export_bundle
    from mmhops_lite.errors import InputError

    with pytest.raises(InputError, match="fp32, int8"):
        export_bundle("onnx", str(tiny_lora[0]), None, tmp_path / "z", quant="int4")
    with pytest.raises(InputError, match="gguf, gguf-adapter, onnx"):
        export_bundle("tflite", str(tiny_lora[0]), None, tmp_path / "z")


def test_tied_head_is_folded_quantized_and_trimmed_to_the_last_position():
    """optimum ties the LM head as MatMul(h, Transpose(E)): it must still be quantized, and run on one position."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx import last_position_logits, weight_only_int8

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(96, 64)).astype(np.float32)  # vocab x hidden
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0]), helper.make_node("MatMul", ["h", "E_t"], ["logits"])],
        "tied", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "s", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 96])], [numpy_helper.from_array(emb, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    last_position_logits(model)
    model = weight_only_int8(model)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" in ops and "Transpose" not in ops and "MatMul" not in ops
    h = rng.normal(size=(1, 5, 64)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"h": h})[0]
    want = h[:, -1:] @ emb.T
    assert got.shape == (1, 1, 96)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert onnx.checker.check_model(model) is None


def test_qwen2_exports_both_ways(tmp_path):
    """The registry's second architecture (Qwen2): merged GGUF and ONNX bundles both pass their parity gates."""
    from tiny_models import make_tiny_hf, save_gguf_tokenizer

    from export.writer import export_bundle
    from mmhops_lite.registry import resolve

    tok = save_gguf_tokenizer(tmp_path / "tok", resolve("smollm2-135m-instruct"))
    base = make_tiny_hf(tmp_path / "qwen", tok, "qwen2", seed=3)
    g = export_bundle("gguf", str(base), None, tmp_path / "g", quant="f16", prompts=6)
    o = export_bundle("onnx", str(base), None, tmp_path / "o", quant="fp32", prompts=6)
    assert g["parity"]["greedy_top1_agreement"] >= 0.98 and o["parity"]["greedy_top1_agreement"] >= 0.98
    assert g["adapter"] is None and o["adapter"] is None


def test_a_new_export_format_is_one_function_and_one_table_entry(tiny_lora, tmp_path, monkeypatch):
    """Register a format (an F32 GGUF, no quantization) and export with it through the api and the CLI's name."""
    from export import formats
    from export.formats import FORMATS, Format
    from mmhops_lite import api
    from mmhops_lite.config import Config
    from mmhops_lite.convert import hf_to_gguf

    def build_f32(job):
        return {"policy.gguf": hf_to_gguf(job.merged(), job.work / "policy.gguf", "f32")}

    monkeypatch.setitem(FORMATS, "gguf-f32", Format(build_f32, "gguf", {"f32": 0.99}, "f32", "unquantized GGUF"))
    assert api.export_formats()["gguf-f32"]["gates"] == {"f32": 0.99}
    base, adapter = tiny_lora
    cfg = Config.resolve({"model.threads": 1}, env={})
    man = api.export_policy("gguf-f32", tmp_path / "f", cfg, model=str(base), adapter=str(adapter), prompts=6)
    assert man["format"] == "gguf-f32" and man["kind"] == "gguf" and man["quant"] == "f32"
    assert man["parity"]["gate"] == 0.99 and man["parity"]["greedy_top1_agreement"] >= 0.99
    assert api.verify_bundle(tmp_path / "f", cfg)["ok"]
    assert api.generator(Config.resolve({"model.policy": str(tmp_path / "f"), "model.threads": 1}, env={})).id \
        == "policy.gguf"
    assert formats.FORMATS is FORMATS


def test_parity_prompts_sample_every_question_kind_whatever_the_file_order():
    from types import SimpleNamespace

    from export.writer import spread

    # A synthesised dev file lists its kinds one after another: the gate's first 50 prompts must still mix them.
    qs = [SimpleNamespace(id=f"{k}{i}", extra={"template": k}, split="Bridge") for k in ("fact", "more", "pick")
          for i in range(40)]
    qs += [SimpleNamespace(id=f"m{i}", extra={}, split="Compare") for i in range(5)]  # MMhops schema: by split
    first = spread(qs)[:50]
    kinds = {q.id.rstrip("0123456789") for q in first}
    assert kinds == {"fact", "more", "pick", "m"}
    assert sorted(q.id for q in spread(qs)) == sorted(q.id for q in qs)  # a reordering, nothing lost or repeated
    assert [q.id for q in first if q.id.startswith("fact")][:3] == ["fact0", "fact1", "fact2"]  # file order kept
