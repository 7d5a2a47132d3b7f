"""One table of protocol-settings flags: parsed by serve-*, rendered back for spawned processes."""

import argparse

import attrs
import pytest

from embxfer.adapters import _serve
from embxfer.adapters.settings_flags import SETTINGS_FLAGS, add_settings_flags, settings_args, settings_from
from embxfer.core import Settings

NON_DEFAULT = Settings(
    block_size=4, default_blocks=3, pool_blocks=77, hidden_size=96, dtype="float16", bootstrap_timeout=12.5,
    waiting_timeout=33.25, transfer_timeout=0.1, quarantine_timeout=200.0, heartbeat_interval=0.3,
    heartbeat_misses=7, data_plane="nixl", prealloc="adaptive", dead_peer_grace=0.75, retention_timeout=42.5, admission_timeout=33.0,
    device="cuda:1",
)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    return parser.parse_args(argv)


@pytest.fixture
def clean_env(monkeypatch):
    """No EMBXFER_* / SGLang variable may leak a value into ``Settings.from_env``."""
    import os

    for name in list(os.environ):
        if name.startswith(("EMBXFER_", "SGLANG_")):
            monkeypatch.delenv(name)


def test_every_settings_field_has_one_flag():
    fields = [flag.field for flag in SETTINGS_FLAGS]
    assert sorted(fields) == sorted(field.name for field in attrs.fields(Settings))
    assert len({flag.flag for flag in SETTINGS_FLAGS}) == len(SETTINGS_FLAGS)


def test_settings_args_round_trip(clean_env):
    assert NON_DEFAULT != Settings()
    for field in attrs.fields(Settings):  # every field differs from its default, so none is lost silently
        assert getattr(NON_DEFAULT, field.name) != field.default, field.name
    args = settings_args(NON_DEFAULT)
    assert "--data-plane" in args and args[args.index("--data-plane") + 1] == "nixl"
    assert "--pool-device" in args and args[args.index("--pool-device") + 1] == "cuda:1"
    assert settings_from(parse(args)) == NON_DEFAULT


def test_round_trip_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("EMBXFER_DATA_PLANE", "mooncake")
    monkeypatch.setenv("EMBXFER_BOOTSTRAP_TIMEOUT", "5")
    monkeypatch.setenv("SGLANG_MULTIMODAL_BLOCK_SIZE", "64")
    assert settings_from(parse(settings_args(NON_DEFAULT))) == NON_DEFAULT


def test_unset_flags_keep_todays_defaults(clean_env):
    settings = settings_from(parse([]))
    assert settings == Settings(pool_blocks=64, hidden_size=256, dtype="bfloat16")


def test_serve_re_exports_the_same_functions():
    assert _serve.add_settings_flags is add_settings_flags
    assert _serve.settings_from is settings_from
