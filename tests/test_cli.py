"""Thin commands: each parses, resolves config and calls one library function; errors exit 1 with [error]."""
import json

import pytest
from fakes import HashTextEncoder, TinyImageEncoder
from typer.testing import CliRunner

import cli
from mmhops_lite import api

runner = CliRunner()


@pytest.fixture
def fake_encoders(monkeypatch):
    monkeypatch.setattr(api, "text_encoder", lambda cfg: HashTextEncoder())
    monkeypatch.setattr(api, "image_encoder", lambda cfg: TinyImageEncoder())


def test_build_passes_resolved_config(monkeypatch, tmp_path):
    seen = {}

    def fake_build(kb, out, cfg, prune=True, progress=True, reencode=False):
        seen.update(kb=kb, out=out, cfg=cfg, prune=prune, progress=progress)
        from mmhops_lite.index.index import BuildReport
        return BuildReport({}, {}, {}, 0.0, {})

    monkeypatch.setattr(api, "build_index", fake_build)
    monkeypatch.setenv("MMHOPS_INDEX_M", "12")
    r = runner.invoke(cli.app, ["index", "build", str(tmp_path), "-o", str(tmp_path / "o"), "--backend", "torch",
                                "--batch-size", "8", "-q"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].encoders.backend == "torch" and seen["cfg"].index.batch_size == 8
    assert seen["cfg"].index.M == 12 and seen["prune"] is True and seen["progress"] is False


def test_end_to_end_with_fake_encoders(fake_encoders, tiny_kb, tmp_path):
    out = tmp_path / "idx"
    r = runner.invoke(cli.app, ["index", "build", str(tiny_kb), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.app, ["index", "info", str(out), "--json"])
    assert json.loads(r.output)["counts"]["images"] == 6
    r = runner.invoke(cli.app, ["index", "search", str(out), "--text", "Doomstadt capital", "-k", "2", "--json"])
    assert json.loads(r.output)[0]["passage"]["id"] == "p-doomstadt"
    r = runner.invoke(cli.app, ["index", "search", str(out), "--image", str(tiny_kb / "images" / "elbonia.png"),
                                "--json"])
    assert json.loads(r.output)[0]["title"] == "Elbonia"
    r = runner.invoke(cli.app, ["index", "remove", str(out), "p-doomstadt"])
    assert r.exit_code == 0 and "'passages': 1" in r.output


def test_errors_exit_1_with_one_line(fake_encoders, tmp_path):
    r = runner.invoke(cli.app, ["index", "info", str(tmp_path / "nothing")])
    assert r.exit_code == 1
    assert "[error]" in r.output and "index build" in r.output
    r = runner.invoke(cli.app, ["index", "search", str(tmp_path), "--text", "a", "--image", "b.png"])
    assert r.exit_code == 1 and "exactly one" in r.output


def test_help_teaches_by_example():
    for args in (["--help"], ["index", "build", "--help"], ["index", "search", "--help"], ["models", "verify", "--help"]):
        r = runner.invoke(cli.app, args)
        assert r.exit_code == 0 and "mmhops-lite" in r.output


def test_models_list_json():
    r = runner.invoke(cli.app, ["models", "list", "--json"])
    names = {m["name"] for m in json.loads(r.output)}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2", "efficientnet-lite0"} <= names


def test_train_options_come_from_the_settings_and_reach_the_api(monkeypatch, tmp_path):
    """`train` restates no default: every flag's default is the settings field's, and the flags given reach
    api.train_policy by name, where they become the settings objects."""
    from dataclasses import fields

    from mmhops_lite.train.settings import SECTIONS, settings_from

    flagged = {f.metadata["flag"]: f.default for cls in SECTIONS.values() for f in fields(cls) if f.metadata["flag"]}
    r = runner.invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and all(flag in r.output for flag in flagged)
    seen = {}
    monkeypatch.setattr(api, "train_policy", lambda *a, **kw: seen.update(args=a, kw=kw) or
                        {"adapter": "a", "out": "o", "seconds": 0})
    r = runner.invoke(cli.app, ["train", str(tmp_path / "q.jsonl"), "--lora", "--grpo-lr", "1e-5", "--seed", "3",
                                "--no-sft", "--reward", "action=0.5", "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    kw = seen["kw"]
    assert kw["sft"] is False and kw["reward"] == "action=0.5" and kw["grpo_lr"] == 1e-5 and kw["seed"] == 3
    built = settings_from({k: v for k, v in kw.items() if k not in ("index", "model", "sft", "reward", "on_event",
                                                                 "from_adapter")})
    defaults = settings_from({})
    assert built["grpo"].lr == 1e-5 and built["grpo"].seed == built["sft"].seed == 3
    assert built["grpo"].steps == defaults["grpo"].steps and built["lora"] == defaults["lora"]
    monkeypatch.undo()  # the real api refuses a bad choice before it loads anything
    r = runner.invoke(cli.app, ["train", "--engine", "onnx"])
    assert r.exit_code == 1 and "--engine 'onnx' is not an option" in r.output
    r = runner.invoke(cli.app, ["train", "--engine", "vllm"])  # vLLM generation is trl's
    assert r.exit_code == 1 and "--trainer trl" in r.output


def test_export_is_one_api_call_by_format_name(monkeypatch, tmp_path):
    seen = []
    man = {"kind": "gguf", "quant": "q8_0", "seconds": 1, "parity": {"greedy_top1_agreement": 1.0, "gate": 0.95,
                                                                       "prompts": 1, "source": "synthetic"}}
    monkeypatch.setattr(api, "export_policy", lambda fmt, out, cfg, **kw: seen.append((fmt, kw)) or man)
    for args, fmt in ((["--gguf"], "gguf"), (["--onnx"], "onnx"), (["--gguf", "--adapter-only"], "gguf-adapter"),
                      (["--format", "gguf-adapter"], "gguf-adapter")):
        r = runner.invoke(cli.app, ["export", *args, "-o", str(tmp_path / "b")])
        assert r.exit_code == 0, r.output
        assert seen[-1][0] == fmt and seen[-1][1]["adapter"] == "auto"
    r = runner.invoke(cli.app, ["export", "--gguf", "--onnx"])
    assert r.exit_code == 1 and "one format" in r.output
    r = runner.invoke(cli.app, ["export", "formats"])
    assert r.exit_code == 0 and "gguf-adapter" in r.output and "q4_k_m" in r.output


def test_front_doors_import_no_internals():
    """cli.py imports only the api (and config/errors); export/ never imports training code."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imported(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                yield node.module
            elif isinstance(node, ast.Import):
                yield from (a.name for a in node.names)

    cli_mods = set(imported(root / "cli.py"))
    assert not [m for m in cli_mods if m.startswith(("mmhops_lite.train", "export"))], cli_mods
    for f in (root / "export").glob("*.py"):
        assert not [m for m in imported(f) if m.startswith("mmhops_lite.train")], f
