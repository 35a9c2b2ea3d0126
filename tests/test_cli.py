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
