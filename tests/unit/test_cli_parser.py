"""The command table of layerfs.cli.main: every command listed by ``layerfs --help`` without importing the
command modules, each command's own parser built from its module when it runs or shows its help."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.cli.main import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[2]
COMMAND_MODULES = {f"layerfs.cli.{module}" for module, _, _ in COMMANDS.values() if module != "main"}
#: an argument list each command accepts, so that its parser is checked to the end
VALID = {
    "pull": ["x"], "load": [], "images": [], "image": ["ls"], "history": ["x"], "inspect": ["x"],
    "search": ["x"], "rmi": ["x"], "prune": [], "login": [], "logout": [], "mount": ["x", "/m"],
    "convert": ["--estargz", "a", "b"], "umount": ["/m"], "rm": ["id"], "mounts": [], "diff": ["/m"],
    "commit": ["/m", "new"], "push": ["x"], "index": ["push", "x"], "export": ["x"], "store": ["serve", "/m"],
    "version": [],
}


def layerfs(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="200")
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "layerfs", *args], capture_output=True, text=True,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)


def imported(p: subprocess.CompletedProcess) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}


def test_the_table_covers_every_command_and_each_module_defines_its_commands():
    assert set(VALID) == set(COMMANDS)
    for name, (module, aliases, _) in COMMANDS.items():
        for typed in (name, *aliases):
            args = build_parser(typed).parse_args([typed, *VALID[name]])
            assert args.command == typed
            assert callable(getattr(args, "func", None)), name
            assert args.func.__module__ == f"layerfs.cli.{module}", name


def test_help_lists_every_command_without_importing_command_modules():
    p = layerfs("--help", importtime=True)
    assert p.returncode == 0, p.stderr
    for name, (_, aliases, help_line) in COMMANDS.items():
        shown = name + (f" ({', '.join(aliases)})" if aliases else "")
        assert any(line.split() == [*shown.split(), *help_line.split()] for line in p.stdout.splitlines()), name
    assert not imported(p) & COMMAND_MODULES, sorted(imported(p) & COMMAND_MODULES)
    p = layerfs("version", importtime=True)
    assert p.returncode == 0 and p.stdout == f"layerfs {__import__('layerfs').__version__}\n"
    assert not imported(p) & (COMMAND_MODULES | {"layerfs.store", "layerfs.registry.client", "requests"})


@pytest.mark.parametrize("command", ["mount", "push", "store"])
def test_command_help_shows_all_arguments_and_imports_only_its_module(command):
    p = layerfs(command, "--help", importtime=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: layerfs {command} ")
    module = f"layerfs.cli.{COMMANDS[command][0]}"
    loaded = imported(p) & COMMAND_MODULES
    assert module in loaded and loaded <= {module, "layerfs.cli.mounts"}, sorted(loaded)   # store uses mounts'
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            if action.help != "==SUPPRESS==":
                assert flag in p.stdout, flag


def test_commands_of_the_local_store_load_no_registry_client(tmp_path):
    """version, mounts, rmi and prune work on the store alone: requests & co. are never imported."""
    registry = {"requests", "urllib3", "layerfs.registry.client", "layerfs.transfer.pull"}
    for args in (["version"], ["mounts"], ["prune"], ["rmi", "nosuch:1"]):
        p = layerfs("--root", str(tmp_path / "store"), *args, importtime=True)
        assert p.returncode == (1 if args[0] == "rmi" else 0), p.stderr[-2000:]
        assert not imported(p) & registry, (args, sorted(imported(p) & registry))


def test_usage_errors_of_a_command_are_its_own(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["mount", "x"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: layerfs mount ") and "the following arguments are required: MOUNTPOINT" in err
    with pytest.raises(SystemExit) as ei:
        main(["--debug", "nosuch"])
    assert ei.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["--bogus", "version"])
    assert ei.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["history", "-H=maybe", "x"])
    assert ei.value.code == 2
    assert "argument -H/--human: invalid boolean value 'maybe'" in capsys.readouterr().err


def test_a_bad_search_filter_is_a_usage_error(capsys):
    """Checked before the index is asked: one line, exit code 2."""
    for bad in ("is-official=maybe", "stars=many", "color=red"):
        assert main(["search", "--index", "http://127.0.0.1:9", "-f", bad, "x"]) == 2
        err = capsys.readouterr().err
        assert err == f"layerfs: error: invalid filter {bad!r} (hint: filters: stars=N, is-official=true|false)\n"
