"""The ``layerfs`` command line: the entry point, the global options and the table of commands.

Each command lives in a module of this package that defines its arguments and its ``cmd_*``
function; :data:`COMMANDS` names that module and the command's line in ``layerfs --help``, so the
parser is built without importing any command module, and only the module of the command that
runs (or whose help is asked for) is imported. A new command is a line in :data:`COMMANDS` and, in the
module of its group, its arguments (``add_arguments``) and its ``cmd_*`` function.

Errors are mapped to exit codes in one place (:func:`main`): 0 ok, 1 error,
2 usage. Every failure is one line on stderr, never a traceback (``--debug``
shows one).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Sequence

from layerfs import __version__
from layerfs.errors import LayerfsError

if TYPE_CHECKING:
    from layerfs.registry import RegistryOptions
    from layerfs.store import Store

log = logging.getLogger(__name__)

VERSION_LINE = f"layerfs {__version__}"

#: command -> (the module of this package that defines it, its aliases, its line in ``layerfs --help``),
#: in the order ``layerfs --help`` lists them
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "pull": ("pull", (), "download an image into the store (or import oci:DIR[:REF], oci-archive:FILE[:REF], "
                         "docker-archive:FILE[:TAG])"),
    "load": ("pull", (), "load images from a docker save archive or an OCI archive/layout"),
    "images": ("images", (), "list local images"),
    "image": ("images", (), "image commands (ls)"),
    "history": ("images", (), "show the layers of an image"),
    "inspect": ("images", (), "image details as JSON"),
    "search": ("search", (), "search Docker Hub (or --index) for images"),
    "rmi": ("remove", (), "remove images (untag; delete blobs nothing else uses)"),
    "prune": ("remove", (), "delete blobs no image references"),
    "login": ("auth", (), "log in to a registry"),
    "logout": ("auth", (), "log out from a registry"),
    "mount": ("mounts", (), "mount an image (pulled if absent); returns once the mount answers"),
    "convert": ("convert", (), "write a converted copy of a local image (eStargz layers)"),
    "umount": ("mounts", ("unmount",), "unmount a layerfs mount"),
    "rm": ("mounttable", (), "delete upper directories the store keeps for writable mounts"),
    "mounts": ("mounttable", (), "list layerfs mounts: running, or dead (daemon gone; 'umount' cleans up)"),
    "diff": ("changes", (), "list what a mount changed (A added, C changed, D deleted)"),
    "commit": ("changes", (), "make a new image from a mount's changes (one layer more)"),
    "push": ("publish", (), "upload an image to a registry"),
    "index": ("publish", (), "publish the layer indexes of an image (for lazy mounts of plain gzip images)"),
    "export": ("changes", (), "write the merged tree of an image or a mount as one tar"),
    "store": ("store", (), "serve layers to container engines (containers/storage additional layer store)"),
    "version": ("main", (), "print the version"),
}
_ALIASES = {alias: name for name, (_, aliases, _) in COMMANDS.items() for alias in aliases}


class Context:
    """What every command gets: the parsed arguments, and the store and registry options they name.
    (A plain class: dataclasses, with inspect and ast, would add some 6 ms to ``version`` and ``--help``.)"""

    def __init__(self, args: argparse.Namespace, *, program: bool = False):
        self.args = args
        self.program = program     # main() runs as the program (its caller exits with its code), not in-process
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        # imported here: version, login, logout and search need no store
        from layerfs.store import Store
        if self._store is None:
            self._store = Store(self.args.root)
        return self._store

    def registry_options(self, **kw) -> RegistryOptions:
        # imported here: the registry client loads requests & co., which a mount of a local image never needs
        from layerfs.registry import RegistryOptions
        return RegistryOptions.from_env(insecure_registries=tuple(self.args.insecure_registry or ()), **kw)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: the global options and every command with its help line; only *command* (a name or an
    alias) gets its arguments, from its module, the others take none."""
    p = argparse.ArgumentParser(prog="layerfs", description="Pull OCI/Docker images and mount them as a union filesystem.")
    p.add_argument("--root", default=None, help="store directory (default /var/lib/layerfs as root, "
                                                "$XDG_DATA_HOME/layerfs otherwise; env LAYERFS_ROOT)")
    p.add_argument("--insecure-registry", action="append", metavar="HOST[:PORT]",
                   help="talk plain HTTP to this registry (repeatable; env LAYERFS_INSECURE_REGISTRIES)")
    p.add_argument("-D", "--debug", action="store_true", help="verbose logs and tracebacks")
    p.add_argument("--version", action="version", version=VERSION_LINE)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _ALIASES.get(command, command)
    for name, (module, aliases, help_line) in COMMANDS.items():
        if name == wanted:
            s = sub.add_parser(name, aliases=list(aliases), help=help_line)
            # __import__, not importlib.import_module: the import statement's path, which -X importtime reports
            __import__(f"{__package__}.{module}", fromlist=["add_arguments"]).add_arguments(name, s)
        else:       # a placeholder: takes whatever follows it, so that the command can be found first
            sub.add_parser(name, aliases=list(aliases), help=help_line, add_help=False)
    return p


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The arguments of this module's command, ``version``."""
    parser.set_defaults(func=cmd_version)


def cmd_version(ctx: Context) -> int:
    print(VERSION_LINE)
    return 0


def _parse(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Find the command (global options, ``--help`` and ``--version`` are handled on the way), then parse
    *argv* with a parser that has that command's arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = build_parser().parse_known_args(args)[0].command
    parser = build_parser(command)
    return parser, parser.parse_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="layerfs: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    ctx = Context(args, program=argv is None)
    try:
        return args.func(ctx)
    except LayerfsError as e:
        if args.debug:
            log.exception("failed")
        print(f"layerfs: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("layerfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except PermissionError as e:
        if args.debug:
            log.exception("failed")
        print(f"layerfs: error: {e.filename or ''}: permission denied "
              f"(hint: run as root or choose a store you own with --root)", file=sys.stderr)
        return 1
    except OSError as e:
        if args.debug:
            log.exception("failed")
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"layerfs: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            raise
        print(f"layerfs: internal error: {type(e).__name__}: {e} (hint: rerun with --debug and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
