import pytest

from mmhops_lite.config import Config, describe
from mmhops_lite.errors import ConfigError


def test_precedence_defaults_toml_env_flags(tmp_path):
    toml = tmp_path / "mmhops.toml"
    toml.write_text("[loop]\nmax_turns = 4\ntop_k = 2\n[index]\nef_search = 50\n")
    env = {"MMHOPS_LOOP_TOP_K": "7", "MMHOPS_INDEX_EF_SEARCH": "60", "MMHOPS_HOME": "/ignored"}
    cfg = Config.resolve({"index.ef_search": 70}, toml, env)
    assert cfg.loop.max_turns == 4  # toml over default
    assert cfg.loop.top_k == 7  # env over toml
    assert cfg.index.ef_search == 70  # flag over env
    assert cfg.search.top_k == 5  # default


def test_bool_and_bad_values(tmp_path):
    assert Config.resolve(env={"MMHOPS_SEARCH_HYBRID": "off"}).search.hybrid is False
    with pytest.raises(ConfigError, match="MMHOPS_LOOP_MAX_TURNS"):
        Config.resolve(env={"MMHOPS_LOOP_MAX_TURNS": "many"})
    with pytest.raises(ConfigError, match="known settings"):
        Config.resolve({"loop.turns": 3}, env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[loop\nmax_turns=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.resolve(toml_path=bad, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        Config.resolve(toml_path=tmp_path / "missing.toml", env={})


def test_every_field_documented():
    rows = describe()
    assert len(rows) > 15 and all(help_ for _, help_, _ in rows)
