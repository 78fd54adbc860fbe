"""``login`` and ``logout``: credentials for a registry, kept where docker keeps them."""
from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

from layerfs.errors import UsageError
from layerfs.image import DOCKER_HUB
from layerfs.registry import Credentials, CredentialStore, normalise_key

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    if command == "login":
        s.add_argument("server", nargs="?", metavar="SERVER")
        s.add_argument("-u", "--username")
        s.add_argument("-p", "--password")
        s.add_argument("--password-stdin", action="store_true")
        s.add_argument("-v", "--verbose", action="store_true")
        s.set_defaults(func=cmd_login)
    elif command == "logout":
        s.add_argument("server", nargs="?", metavar="SERVER")
        s.set_defaults(func=cmd_logout)


def cmd_login(ctx: Context) -> int:
    # imported here: the registry client loads requests & co., which logout never needs
    from layerfs.registry import RegistryClient
    a = ctx.args
    server = _server_name(a.server)
    user = a.username
    password = a.password
    if a.password_stdin:
        if password:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        if not user:
            raise UsageError("--password-stdin needs --username")
        password = sys.stdin.read().rstrip("\r\n")
    if not user:
        if not sys.stdin.isatty():
            raise UsageError("no username given and no terminal to ask on", hint="use --username/-u")
        user = input("Username: ").strip()
    if password is None:
        if not sys.stdin.isatty():
            raise UsageError("no password given and no terminal to ask on", hint="use --password-stdin")
        password = getpass.getpass("Password: ")
    if not user or not password:
        raise UsageError("username and password must not be empty")
    creds = Credentials(user, password)
    client = RegistryClient(server, ctx.registry_options(credentials=creds))
    client.ping()
    where = CredentialStore().store(server, creds)
    print(f"Login Succeeded (credentials saved to {where})" if a.verbose else "Login Succeeded")
    return 0


def cmd_logout(ctx: Context) -> int:
    server = _server_name(ctx.args.server)
    if CredentialStore().erase(server):
        print(f"Removing login credentials for {server}")
    else:
        print(f"Not logged in to {server}")
    return 0


def _server_name(text: str | None) -> str:
    if not text:
        return DOCKER_HUB
    return normalise_key(text)
