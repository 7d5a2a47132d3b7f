"""The serving commands' authentication: ``--auth-keys FILE`` (``EMBXFER_AUTH_KEYS``), or an
explicit ``--insecure`` (``EMBXFER_INSECURE=1``) for a trusted network; neither is an error
that says how to make keys.  And ``embxfer keygen``."""

from __future__ import annotations

import argparse
import os
import sys

from embxfer.transports.auth import AuthKeys, AuthKeysError, check_key, load_keys, write_keys

TRUE = ("1", "true", "yes", "on")


def add_auth_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auth-keys", metavar="FILE", default=None,
                        help="CURVE keys (embxfer keygen) for the ZeroMQ sockets; also EMBXFER_AUTH_KEYS")
    parser.add_argument("--insecure", action="store_true",
                        help="no authentication: anyone who reaches the ports can register, send and abort "
                             "(a trusted network only); also EMBXFER_INSECURE=1")


class AuthChoiceError(Exception):
    """The command line names no usable keys; the message says what to do."""


def auth_from(args: argparse.Namespace, role: str) -> AuthKeys | None:
    """The keys ``role`` ("encode" or "language") runs with, or None for --insecure."""
    if args.auth_keys and args.insecure:
        raise AuthChoiceError("give --auth-keys or --insecure, not both")
    # a flag wins over the environment; of the two variables, the keys win
    path = args.auth_keys or (None if args.insecure else os.environ.get("EMBXFER_AUTH_KEYS") or None)
    insecure = args.insecure or (path is None and os.environ.get("EMBXFER_INSECURE", "").lower() in TRUE)
    if insecure:  # (the serve commands say so in their first line)
        return None
    if not path:
        raise AuthChoiceError(
            "the ZeroMQ sockets are authenticated by default: run `embxfer keygen embxfer.keys` once and pass "
            "--auth-keys embxfer.keys to both serve commands (or EMBXFER_AUTH_KEYS), or --insecure on a "
            "trusted network")
    try:
        keys = load_keys(path)
        return keys.for_encode() if role == "encode" else keys.for_language()
    except AuthKeysError as error:
        raise AuthChoiceError(f"--auth-keys {path}: {error}") from None


def add_keygen(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    keygen = commands.add_parser(
        "keygen", help="write CURVE keys for --auth-keys",
        description="Writes a new keys file (owner-readable only; never overwrites). Default: both key pairs, one "
                    "file for every process of a deployment. --role language --encode-public KEY: a language "
                    "side's own pair; add the language-public line it prints to the encode side's file.")
    keygen.add_argument("path", metavar="FILE")
    keygen.add_argument("--role", choices=["deployment", "language"], default="deployment")
    keygen.add_argument("--encode-public", default=None, help="with --role language: the encode side's public key")


def keygen(args: argparse.Namespace) -> int:
    import zmq

    try:
        if args.role == "deployment":
            keys = AuthKeys.generate()
        else:
            if not args.encode_public:
                raise AuthKeysError("encode-public", "--role language needs --encode-public (from the encode side's file)")
            _, secret = zmq.curve_keypair()
            keys = AuthKeys(check_key("--encode-public", args.encode_public), None, (), secret)
        write_keys(args.path, keys)
    except FileExistsError:
        print(f"embxfer keygen: {args.path} exists; not overwritten", file=sys.stderr)
        return 2
    except (AuthKeysError, OSError) as error:
        print(f"embxfer keygen: {error}", file=sys.stderr)
        return 2
    if args.role == "deployment":
        print(f"embxfer keygen: wrote {args.path} (the encode and the language key pair): pass --auth-keys "
              f"{args.path} to serve-encode and to every serve-language, and keep it secret")
    else:
        print(f"embxfer keygen: wrote {args.path}; add this line to the encode side's keys file:\n"
              f"language-public = {keys.language_public.decode() if keys.language_public else ''}")
    return 0
