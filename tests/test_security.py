"""Authenticated control (and zmq data) sockets: ZeroMQ CURVE with keys from ``embxfer keygen``.

The serve commands refuse to start without keys unless told --insecure; a peer without an
admitted key gets nothing from a running serve-encode: no decode, no registration, no
tombstone, while an honest serve-language beside it keeps every room exact."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import time

import pytest
import zmq

from embxfer.core import Abort, Init, Register, encode
from embxfer.transports.auth import AuthKeys, AuthKeysError, load_keys, parse_keys, write_keys

from test_two_process import CLI, SETTINGS, summary_of

SECURE_ENV = {k: v for k, v in os.environ.items() if k != "EMBXFER_INSECURE"}


@pytest.fixture
def keys_file(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "deploy.keys"
    done = subprocess.run([*CLI, "keygen", str(path)], capture_output=True, text=True, env=SECURE_ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    return path


def start_secure_encode(*extra: str, env: dict[str, str] = SECURE_ENV) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [*CLI, "serve-encode", "--bootstrap-port", "0", "--synthetic-seed", "5", "--json", "--no-progress",
         "--status-every", "0.5", *SETTINGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = process.stdout.readline()
    assert "ready on" in line, line + process.stderr.read()
    return process, line.split("ready on ", 1)[1].split()[0]


def secure_language(addr: str, requests: int, *extra: str, env: dict[str, str] = SECURE_ENV) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "serve-language", "--bootstrap-addr", addr, "--requests", str(requests), "--verify",
         "--synthetic-seed", "5", "--json", "--no-progress", *SETTINGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def stop(process: subprocess.Popen) -> tuple[dict, list[dict], str]:
    """SIGINT serve-encode: (its summary, its status lines, its stderr)."""
    process.send_signal(2)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    statuses = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"status"')]
    return summary_of(out), statuses, err


# -- the keys file -----------------------------------------------------------------------------

def test_keygen_writes_a_secret_file_once_and_both_sides_can_use_it(keys_file) -> None:  # type: ignore[no-untyped-def]
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    keys = load_keys(keys_file)
    assert keys.for_encode().admitted() == {keys.language_public} and keys.for_language() is keys
    again = subprocess.run([*CLI, "keygen", str(keys_file)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists; not overwritten" in again.stderr
    # an allow-list: a language side's own pair, its public line added to the encode side's file
    language_file = keys_file.parent / "language.keys"
    done = subprocess.run([*CLI, "keygen", str(language_file), "--role", "language",
                           "--encode-public", keys.encode_public.decode()], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    language = load_keys(language_file).for_language()
    assert line == f"language-public = {language.language_public.decode()}"
    with pytest.raises(AuthKeysError) as error:
        language.for_encode()
    assert error.value.field == "encode-secret"
    both = parse_keys(keys_file.read_text() + line + "\n")
    assert both.for_encode().admitted() == {keys.language_public, language.language_public}


@pytest.mark.parametrize("text, field", [
    ("", "encode-public"),
    ("encode-public = short\n", "keys:1 encode-public"),
    ("encode-pubic = " + "a" * 40 + "\n", "keys:1"),
    ("encode-public = " + "\x01" * 40 + "\n", "keys:1 encode-public"),
])
def test_a_bad_keys_file_names_the_field(text: str, field: str) -> None:
    with pytest.raises(AuthKeysError) as error:
        parse_keys(text)
    assert error.value.field == field


def test_the_serve_commands_refuse_to_start_without_keys_or_insecure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for command in (["serve-encode", "--bootstrap-port", "0"], ["serve-language", "--bootstrap-addr", "127.0.0.1:1",
                                                                "--requests", "1"]):
        done = subprocess.run([*CLI, *command], capture_output=True, text=True, env=SECURE_ENV, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "authenticated by default: run `embxfer keygen embxfer.keys`" in done.stderr, done.stderr
    write_keys(tmp_path / "only-language.keys", AuthKeys(AuthKeys.generate().encode_public, None, (),
                                                         AuthKeys.generate().language_secret))
    done = subprocess.run([*CLI, "serve-encode", "--bootstrap-port", "0", "--auth-keys",
                           str(tmp_path / "only-language.keys")], capture_output=True, text=True, env=SECURE_ENV,
                          timeout=60)
    assert done.returncode == 2 and "encode-secret: the encode side needs its secret key" in done.stderr, done.stderr


# -- honest peers with keys, peers without -----------------------------------------------------

@pytest.mark.parametrize("plane", ["mooncake", "zmq", "shm"])
def test_both_sides_with_the_keys_verify_every_row(keys_file, plane: str) -> None:  # type: ignore[no-untyped-def]
    encode, addr = start_secure_encode("--auth-keys", str(keys_file), "--data-plane", plane)
    try:
        process = secure_language(addr, 30, "--auth-keys", str(keys_file), "--data-plane", plane)
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        summary = summary_of(out)
        assert summary["succeeded"] == 30 and summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0
    finally:
        encode_summary, _, _ = stop(encode)
    assert encode_summary["succeeded"] == 30 and encode_summary["counters"].get("handshakes_refused", 0) == 0


@pytest.mark.parametrize("other", ["another deployment's keys", "--insecure"])
def test_a_language_side_without_the_right_keys_is_refused_at_once(keys_file, tmp_path, other: str) -> None:  # type: ignore[no-untyped-def]
    encode, addr = start_secure_encode("--auth-keys", str(keys_file))
    try:
        if other == "--insecure":
            flags = ["--insecure"]
        else:
            write_keys(tmp_path / "other.keys", AuthKeys.generate())
            flags = ["--auth-keys", str(tmp_path / "other.keys")]
        started = time.monotonic()
        process = secure_language(addr, 3, *flags, env={**SECURE_ENV, "EMBXFER_BOOTSTRAP_TIMEOUT": "3"})
        _, err = process.communicate(timeout=60)
        took = time.monotonic() - started
        assert process.returncode == 2, err
        assert "refused the registration: the secure handshake failed: its key differs" in err, err
        assert took < 10, took
        print(f"[security] a language side with {other}: exit 2 after {took:.2f} s (process start included)")
    finally:
        summary, _, _ = stop(encode)
    counters = summary["counters"]
    assert counters["handshakes_refused"] >= 1 and counters.get("registrations", 0) == 0, counters
    assert counters.get("decode_errors", 0) == 0


# -- attacks from a stranger without keys, each bounded --------------------------------------------

def all_400_exact(honest: subprocess.Popen) -> None:
    out, err = honest.communicate(timeout=180)
    assert honest.returncode == 0, err
    summary = summary_of(out)
    assert summary["succeeded"] == 400 and summary["failed"] == 0 and summary["wrong_rows"] == 0, summary


def attacker_socket(context: zmq.Context, addr: str, curve: bool) -> zmq.Socket:
    """A stranger's DEALER: plain, or CURVE with a key pair of its own (it knows the server's
    public key, which is no secret)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    if curve:
        server_public = load_keys(os.environ["EMBXFER_TEST_KEYS"]).encode_public
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
    sock.connect(f"tcp://{addr}")
    return sock


def send(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Queue without blocking; a socket whose handshake failed has nowhere to send (Again)."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass


def attack(name: str, context: zmq.Context, addr: str, port: int) -> int:
    """One row of issue 12's table, bounded in count; returns the connections it opened."""
    rng = random.Random(name)
    register = Register(1, 2, 7, 16, 32, "float16", "x", "127.0.0.1:1", "mooncake")
    if name == "aborts as another rank":
        for curve in (False, True):
            sock = attacker_socket(context, addr, curve)
            send(sock, encode(register))
            for room in range(20_000):
                send(sock, encode(Abort(room, 1, "hostile")))
        return 2
    if name == "huge inits":
        sock = attacker_socket(context, addr, False)
        extents = tuple((i, 1) for i in range(60_000))
        for room in range(40):
            send(sock, encode(Init(10_000_000 + room, 1, 2, 16, 16 * 60_000, extents)))
        return 1
    if name == "registers of every rank":
        sock = attacker_socket(context, addr, True)
        for rank in range(20_000):
            send(sock, encode(Register(rank, rank + 1, rank, 16, 32, "float16", "x", "y", "mooncake")))
        return 1
    if name == "steal rank 0":
        for curve in (False, True):
            sock = attacker_socket(context, addr, curve)
            sock.setsockopt(zmq.ROUTING_ID, b"embxfer-rank0-steal")
            send(sock, encode(Register(0, 1, 99, 16, 32, "float16", "x", "y", "mooncake")))
        return 2
    # garbage: frames, a raw TCP connection storm
    sock = attacker_socket(context, addr, False)
    for _ in range(5_000):
        send(sock, [rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(1, 4))])
    for i in range(300):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(rng.randbytes(1 + i))
    return 301


ATTACKS = ["aborts as another rank", "huge inits", "registers of every rank", "steal rank 0", "garbage"]


@pytest.mark.parametrize("name", ATTACKS)
def test_a_stranger_without_an_admitted_key_has_no_effect(keys_file, monkeypatch, name: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EMBXFER_TEST_KEYS", str(keys_file))
    encode, addr = start_secure_encode("--auth-keys", str(keys_file))
    context = zmq.Context()
    try:
        honest = secure_language(addr, 400, "--auth-keys", str(keys_file), "--in-flight", "8")
        connections = attack(name, context, addr, int(addr.rsplit(":", 1)[1]))
        all_400_exact(honest)
    finally:
        context.destroy(linger=0)
        encode_summary, statuses, encode_err = stop(encode)
    counters = encode_summary["counters"]
    # nothing of the stranger's reached the protocol: one registration (the honest one), no
    # decode error, nothing dropped as unregistered, no tombstone beyond the honest rooms'
    assert counters.get("registrations", 0) == 1 and counters.get("registrations_held", 0) == 0, counters
    assert counters.get("decode_errors", 0) == 0 and counters.get("unregistered_dropped", 0) == 0, counters
    assert sum(encode_summary["dropped"].values()) == 0, encode_summary["dropped"]
    assert counters["handshakes_refused"] >= 1, counters
    rss = [status["rss_mb"] for status in statuses]
    assert max(rss) <= 1.2 * rss[0], rss
    print(f"[security] {name} ({connections} connection(s)): 400/400 honest rooms exact; "
          f"{counters['handshakes_refused']} handshakes refused; encode RSS {rss[0]:.0f} -> {max(rss):.0f} MB")


# -- without keys (--insecure): a stranger registered as another rank ---------------------------

@pytest.mark.parametrize("name", ["aborts as another rank", "steal rank 0"])
def test_with_insecure_a_strangers_rank_cannot_end_or_take_the_honest_rooms(name: str) -> None:
    """Anyone may register a rank nobody holds; it speaks only for its own room set.  Its
    aborts of the honest rooms (in flight, finished, not yet started) are dropped, and the
    honest rank 0 is refused to it while its holder lives."""
    server, addr = start_secure_encode("--insecure")
    context = zmq.Context()
    try:
        honest = secure_language(addr, 400, "--insecure", "--in-flight", "8", "--no-progress")
        # the stranger acts once the honest client holds rank 0 (the encode side's status says so)
        while not json.loads(server.stdout.readline()).get("peers_alive"):
            assert honest.poll() is None, honest.communicate()
        stranger = context.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(f"tcp://{addr}")
        if name == "steal rank 0":
            stranger.send_multipart(encode(Register(0, 1, 99, 16, 32, "float16", "x", "127.0.0.1:1", "mooncake")))
        else:
            stranger.send_multipart(encode(Register(1, 2, 7, 16, 32, "float16", "x", "127.0.0.1:1", "mooncake")))
            assert stranger.poll(30_000), "the stranger's registration was not answered"
            stranger.recv_multipart()
            for round_ in range(3):  # ids the honest client has finished, has in flight, will start
                for room in range(400):
                    stranger.send_multipart(encode(Abort(room, 1, "hostile")))
        all_400_exact(honest)
    finally:
        context.destroy(linger=0)
        encode_summary, _, _ = stop(server)
    counters = encode_summary["counters"]
    assert encode_summary["failed"] == 0, encode_summary
    if name == "steal rank 0":
        assert counters["registrations_held"] == 1 and counters["registrations"] == 1, counters
    else:
        assert counters.get("foreign_dropped", 0) + counters.get("foreign_tombstones_ignored", 0) > 0, counters
    print(f"[security] --insecure, {name}: 400/400 honest rooms exact, 0 failed; "
          f"foreign dropped {counters.get('foreign_dropped', 0)}, tombstones ignored "
          f"{counters.get('foreign_tombstones_ignored', 0)}, registrations refused {counters.get('registrations_held', 0)}")
