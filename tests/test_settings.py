"""Settings: defaults, validation, and environment overrides (read in one place only)."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer.core import LocalProtocolError, ProtocolError, Settings, SettingsError

INT_FIELDS = ("block_size", "default_blocks", "pool_blocks", "hidden_size", "heartbeat_misses")
TIMEOUT_FIELDS = (
    "bootstrap_timeout", "waiting_timeout", "transfer_timeout", "quarantine_timeout", "heartbeat_interval",
    "dead_peer_grace", "retention_timeout", "admission_timeout",
)
ALIASES = {
    "block_size": "SGLANG_MULTIMODAL_BLOCK_SIZE",
    "default_blocks": "SGLANG_DEFAULT_MULTIMODAL_BLOCKS",
    "pool_blocks": "SGLANG_EMBEDDING_CACHE_BUFFER_SIZE",
}


def settings_error(factory: object, *args: object, **kwargs: object) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        factory(*args, **kwargs)  # type: ignore[operator]
    err = info.value
    assert isinstance(err, LocalProtocolError) and isinstance(err, ProtocolError)
    assert isinstance(err, ValueError)
    assert err.field is not None and err.field in str(err)
    return err


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    s = Settings()
    assert s.block_size == 128
    assert s.default_blocks == 8
    assert s.pool_blocks == 64
    assert s.default_tokens == 8 * 128
    assert s.pool_tokens == 64 * 128
    for name in TIMEOUT_FIELDS:
        value = getattr(s, name)
        assert isinstance(value, (int, float)) and 0 < value < math.inf
    assert s.dtype in ("float32", "float16", "bfloat16")


def test_field_set() -> None:
    names = {f.name for f in attrs.fields(Settings)}
    assert set(INT_FIELDS) | set(TIMEOUT_FIELDS) | {"dtype", "data_plane", "prealloc", "device"} == names


@pytest.mark.parametrize("field, good, bad", [("data_plane", "zmq", "tcp"), ("prealloc", "adaptive", "learned")])
def test_choice_fields(field: str, good: str, bad: str) -> None:
    assert getattr(Settings(**{field: good}), field) == good
    assert settings_error(Settings, **{field: bad}).field == field
    env = {f"EMBXFER_{field.upper()}": bad}
    error = settings_error(Settings.from_env, env)
    assert error.field == f"EMBXFER_{field.upper()}" and good in str(error)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtype_names_accepted(dtype: str) -> None:
    assert Settings(dtype=dtype).dtype == dtype


@pytest.mark.parametrize("dtype", ["float64", "bf16", "fp16", "Float32", "", "int8", None, 3])
def test_dtype_names_rejected(dtype: object) -> None:
    assert settings_error(Settings, dtype=dtype).field == "dtype"


def test_frozen() -> None:
    s = Settings()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.block_size = 64  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.bootstrap_timeout = 1.0  # type: ignore[misc]
    assert s.block_size == 128


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("bad", [0, -1, -128, True, False, 1.0, 2.5, "8", None])
def test_int_fields_rejected(field: str, bad: object) -> None:
    kwargs = {field: bad}
    if field == "pool_blocks":
        kwargs["default_blocks"] = 1  # so only the bad value can be blamed
    assert settings_error(Settings, **kwargs).field == field


@settings(max_examples=100, deadline=None)
@given(block_size=st.integers(1, 1 << 20), default=st.integers(1, 512), extra=st.integers(0, 512))
def test_valid_ints_accepted(block_size: int, default: int, extra: int) -> None:
    s = Settings(block_size=block_size, default_blocks=default, pool_blocks=default + extra)
    assert (s.block_size, s.default_blocks, s.pool_blocks) == (block_size, default, default + extra)
    assert s.pool_tokens == (default + extra) * block_size


@pytest.mark.parametrize("field", TIMEOUT_FIELDS)
@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.inf, -math.inf, math.nan, True, "1", None])
def test_timeouts_rejected(field: str, bad: object) -> None:
    assert settings_error(Settings, **{field: bad}).field == field


@pytest.mark.parametrize("field", TIMEOUT_FIELDS)
def test_timeouts_accepted(field: str) -> None:
    # the quarantine must outlast bootstrap + waiting (the timing rule): shrink those with it
    rule = {"bootstrap_timeout": 0.0005, "waiting_timeout": 0.0004} if field == "quarantine_timeout" else {}
    assert getattr(Settings(**{**rule, field: 0.001}), field) == 0.001
    assert getattr(Settings(**{**rule, field: 7}), field) == 7


def test_the_timing_rule_is_enforced_naming_the_fields_and_the_minimum() -> None:
    error = settings_error(Settings, bootstrap_timeout=5.0, waiting_timeout=7.0, quarantine_timeout=11.0)
    assert error.field == "quarantine_timeout"
    assert "bootstrap_timeout + waiting_timeout (5 + 7 = 12 s)" in str(error) and "(11 s)" in str(error)
    assert settings_error(Settings, quarantine_timeout=150.0).field == "quarantine_timeout"  # equal is not enough
    assert Settings(quarantine_timeout=150.5).quarantine_timeout == 150.5
    env_error = settings_error(Settings.from_env, {"EMBXFER_WAITING_TIMEOUT": "500"})
    assert env_error.field == "EMBXFER_WAITING_TIMEOUT"  # the variable that broke it
    # the one escape hatch: showing what a short quarantine breaks (the checker), never serving
    short = Settings.breaking_the_timing_rule(bootstrap_timeout=10.0, waiting_timeout=10.0, quarantine_timeout=15.0)
    assert short.quarantine_timeout == 15.0 and short.bootstrap_timeout == 10.0
    assert settings_error(Settings.breaking_the_timing_rule, quarantine_timeout=-1.0).field == "quarantine_timeout"


@pytest.mark.parametrize(("values", "field"), [
    ({"block_size": 2**32}, "block_size"), ({"hidden_size": 2**32}, "hidden_size"),
    ({"pool_blocks": 2**32, "default_blocks": 1}, "pool_blocks"),
    ({"pool_blocks": 2**25, "block_size": 2**8}, "pool_blocks"),  # 2**33 slots: more than a u32 names
])
def test_sizes_the_wire_cannot_carry_are_refused(values: dict, field: str) -> None:
    assert settings_error(Settings, **values).field == field


def test_a_size_variable_the_wire_cannot_carry_names_the_variable() -> None:
    error = settings_error(Settings.from_env, {"EMBXFER_BLOCK_SIZE": "4294967296"})
    assert error.field == "EMBXFER_BLOCK_SIZE" and "4294967295" in str(error)


def test_default_blocks_must_fit_pool() -> None:
    assert Settings(default_blocks=64, pool_blocks=64).default_blocks == 64
    assert settings_error(Settings, default_blocks=65, pool_blocks=64).field == "default_blocks"
    assert settings_error(Settings, pool_blocks=4).field == "default_blocks"


# --------------------------------------------------------------------------- environment


def test_from_env_empty_is_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_from_env_unrelated_variables_ignored() -> None:
    assert Settings.from_env({"BLOCK_SIZE": "7", "EMBXFER_NOPE": "x", "SGLANG_FOO": "1"}) == Settings()


def test_from_env_native_names() -> None:
    env = {
        "EMBXFER_BLOCK_SIZE": "64",
        "EMBXFER_DEFAULT_BLOCKS": "4",
        "EMBXFER_POOL_BLOCKS": "32",
        "EMBXFER_HIDDEN_SIZE": "4096",
        "EMBXFER_DTYPE": "float16",
        "EMBXFER_BOOTSTRAP_TIMEOUT": "2.5",
        "EMBXFER_WAITING_TIMEOUT": "10",
        "EMBXFER_TRANSFER_TIMEOUT": "0.25",
        "EMBXFER_QUARANTINE_TIMEOUT": "1.5e1",
        "EMBXFER_HEARTBEAT_INTERVAL": " 0.5 ",
        "EMBXFER_HEARTBEAT_MISSES": "3",
    }
    s = Settings.from_env(env)
    assert s == Settings(
        block_size=64, default_blocks=4, pool_blocks=32, hidden_size=4096, dtype="float16",
        bootstrap_timeout=2.5, waiting_timeout=10.0, transfer_timeout=0.25, quarantine_timeout=15.0,
        heartbeat_interval=0.5, heartbeat_misses=3,
    )
    assert type(s.block_size) is int and type(s.bootstrap_timeout) is float
    assert type(s.waiting_timeout) is float


@pytest.mark.parametrize("field, alias", sorted(ALIASES.items()))
def test_from_env_sglang_aliases(field: str, alias: str) -> None:
    s = Settings.from_env({alias: "16"})
    assert getattr(s, field) == 16
    for other in INT_FIELDS:
        if other != field:
            assert getattr(s, other) == getattr(Settings(), other)


@pytest.mark.parametrize("field, alias", sorted(ALIASES.items()))
def test_native_name_wins_over_alias(field: str, alias: str) -> None:
    env = {alias: "16", f"EMBXFER_{field.upper()}": "32"}
    assert getattr(Settings.from_env(env), field) == 32
    # the ignored alias is not even parsed
    env = {alias: "garbage", f"EMBXFER_{field.upper()}": "32"}
    assert getattr(Settings.from_env(env), field) == 32


@pytest.mark.parametrize("field, alias", sorted(ALIASES.items()))
def test_overrides_win_over_both(field: str, alias: str) -> None:
    env = {alias: "16", f"EMBXFER_{field.upper()}": "32"}
    assert getattr(Settings.from_env(env, **{field: 24}), field) == 24
    # an override also replaces a bad environment value without blaming it
    env = {alias: "abc", f"EMBXFER_{field.upper()}": "0"}
    assert getattr(Settings.from_env(env, **{field: 16}), field) == 16


def test_overrides_are_validated() -> None:
    err = settings_error(Settings.from_env, {"EMBXFER_BLOCK_SIZE": "64"}, block_size=0)
    assert err.field == "block_size"
    err = settings_error(Settings.from_env, {}, bootstrap_timeout=-1.0)
    assert err.field == "bootstrap_timeout"


BAD_INTS = ["0", "-3", "abc", "1.5", "", "  ", "1_000", "0x10", "+-1", "٣"]


@pytest.mark.parametrize("raw", BAD_INTS)
@pytest.mark.parametrize(
    "variable",
    [
        "SGLANG_MULTIMODAL_BLOCK_SIZE", "SGLANG_DEFAULT_MULTIMODAL_BLOCKS", "SGLANG_EMBEDDING_CACHE_BUFFER_SIZE",
        "EMBXFER_BLOCK_SIZE", "EMBXFER_HIDDEN_SIZE", "EMBXFER_HEARTBEAT_MISSES",
    ],
)
def test_bad_int_values_name_the_variable(variable: str, raw: str) -> None:
    err = settings_error(Settings.from_env, {variable: raw})
    assert err.field == variable
    assert variable in str(err)
    assert repr(raw) in str(err)


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "", "inf", "nan", "-inf", "1e400"])
@pytest.mark.parametrize("variable", ["EMBXFER_BOOTSTRAP_TIMEOUT", "EMBXFER_QUARANTINE_TIMEOUT"])
def test_bad_timeouts_name_the_variable(variable: str, raw: str) -> None:
    err = settings_error(Settings.from_env, {variable: raw})
    assert err.field == variable and variable in str(err)


def test_bad_dtype_names_the_variable() -> None:
    err = settings_error(Settings.from_env, {"EMBXFER_DTYPE": "float64"})
    assert err.field == "EMBXFER_DTYPE" and "EMBXFER_DTYPE" in str(err)
    assert Settings.from_env({"EMBXFER_DTYPE": " float32\n"}).dtype == "float32"


def test_cross_field_error_names_the_variable() -> None:
    err = settings_error(Settings.from_env, {"SGLANG_DEFAULT_MULTIMODAL_BLOCKS": "100"})
    assert err.field == "SGLANG_DEFAULT_MULTIMODAL_BLOCKS"
    err = settings_error(Settings.from_env, {"EMBXFER_DEFAULT_BLOCKS": "65", "EMBXFER_POOL_BLOCKS": "64"})
    assert err.field == "EMBXFER_DEFAULT_BLOCKS"
    # the pool was shrunk below the default guess: the pool's variable is the one to blame
    err = settings_error(Settings.from_env, {"SGLANG_EMBEDDING_CACHE_BUFFER_SIZE": "4"})
    assert err.field == "SGLANG_EMBEDDING_CACHE_BUFFER_SIZE"
    assert Settings.from_env({"SGLANG_EMBEDDING_CACHE_BUFFER_SIZE": "4", "EMBXFER_DEFAULT_BLOCKS": "4"}).pool_blocks == 4


@settings(max_examples=100, deadline=None)
@given(
    block=st.integers(1, 1 << 20), pool=st.integers(8, 4096), seconds=st.floats(1e-3, 1e6, allow_nan=False),
    use_alias=st.booleans(),
)
def test_from_env_property(block: int, pool: int, seconds: float, use_alias: bool) -> None:
    env = {
        ("SGLANG_MULTIMODAL_BLOCK_SIZE" if use_alias else "EMBXFER_BLOCK_SIZE"): str(block),
        ("SGLANG_EMBEDDING_CACHE_BUFFER_SIZE" if use_alias else "EMBXFER_POOL_BLOCKS"): str(pool),
        "EMBXFER_TRANSFER_TIMEOUT": repr(seconds),
    }
    s = Settings.from_env(env)
    assert (s.block_size, s.pool_blocks, s.transfer_timeout) == (block, pool, seconds)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith(("EMBXFER_", "SGLANG_")):
            monkeypatch.delenv(name)
    assert Settings.from_env() == Settings()
    monkeypatch.setenv("SGLANG_MULTIMODAL_BLOCK_SIZE", "32")
    monkeypatch.setenv("EMBXFER_BOOTSTRAP_TIMEOUT", "2.5")
    s = Settings.from_env()
    assert s.block_size == 32 and s.bootstrap_timeout == 2.5
    assert Settings.from_env(block_size=16).block_size == 16
    # an explicit environ mapping is used instead of os.environ
    assert Settings.from_env({}).block_size == 128
    monkeypatch.setenv("EMBXFER_BLOCK_SIZE", "abc")
    err = settings_error(Settings.from_env)
    assert err.field == "EMBXFER_BLOCK_SIZE"
