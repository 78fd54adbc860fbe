"""``docker commit --change``: the Dockerfile instructions a commit applies to the image config.

:func:`apply_changes` reads the changes as one Dockerfile (continuation lines,
comments), takes CMD and ENTRYPOINT in the exec or shell form, and processes the
arguments of ENV, LABEL, EXPOSE, USER, VOLUME, WORKDIR and STOPSIGNAL as docker's
shell-word lexer does (quotes, escapes, ``$VAR`` expansion from the image's Env).
Anything docker commit would refuse raises :class:`ChangeSyntaxError`.
"""
from __future__ import annotations

import copy
import json
import posixpath
import re
from typing import Iterator, Mapping, Sequence

from layerfs.errors import UsageError

__all__ = ["ChangeSyntaxError", "apply_changes"]


class ChangeSyntaxError(UsageError):
    """A ``--change`` instruction docker commit would refuse."""

    default_hint = ("use Dockerfile syntax, e.g. -c 'CMD [\"nginx\", \"-g\", \"daemon off;\"]' or -c 'ENV A=1'; "
                    "allowed: CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR")


_COMMIT_INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "ONBUILD", "STOPSIGNAL", "USER",
                        "VOLUME", "WORKDIR")
_ALL_INSTRUCTIONS = frozenset(_COMMIT_INSTRUCTIONS + ("ADD", "ARG", "COPY", "FROM", "HEALTHCHECK", "MAINTAINER",
                                                      "RUN", "SHELL"))
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]")
_SIGNALS = {"ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL", "PIPE",
            "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP", "TTIN",
            "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ", "UNUSED"}


def _instructions(changes: Sequence[str]) -> Iterator[tuple[str, str, str]]:
    """(INSTRUCTION, rest, original) per instruction; the changes are read as one Dockerfile
    (docker joins them with newlines): ``\\`` at the end of a line continues it, ``#`` lines are comments."""
    logical: list[str] = []
    cur = ""
    for line in "\n".join(changes).split("\n"):
        if not cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1]
            continue
        logical.append(cur + line)
        cur = ""
    if cur:
        logical.append(cur)
    for text in logical:
        text = text.strip()
        if not text:
            continue
        m = re.match(r"(\S+)\s*(.*)", text, re.S)
        yield m.group(1).upper(), m.group(2).strip(), text


def _words(text: str) -> list[str]:
    """Split on unquoted whitespace, keeping quotes and escapes in the words (docker's parseWords)."""
    words: list[str] = []
    cur = ""
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote is None and ch.isspace():
            if cur:
                words.append(cur)
                cur = ""
            i += 1
            continue
        if ch == "\\" and i + 1 < len(text) and quote != "'":
            cur += text[i:i + 2]
            i += 2
            continue
        if quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
        cur += ch
        i += 1
    if cur:
        words.append(cur)
    return words


class _Lex:
    """Docker's shell-word processing for ENV, LABEL, EXPOSE, USER, VOLUME, WORKDIR, STOPSIGNAL:
    quotes removed, ``\\`` escapes, ``$VAR`` / ``${VAR}`` / ``${VAR:-x}`` ``${VAR-x}``
    ``${VAR:+x}`` ``${VAR+x}`` ``${VAR:?msg}`` ``${VAR?msg}`` expanded from *env*."""

    def __init__(self, env: Mapping[str, str], what: str):
        self.env = env
        self.what = what

    def word(self, text: str) -> str:
        out = self._process(text, split=False)
        return out[0] if out else ""

    def words(self, text: str) -> list[str]:
        return self._process(text, split=True)

    def _err(self, msg: str) -> ChangeSyntaxError:
        return ChangeSyntaxError(f"{self.what}: {msg}")

    def _process(self, text: str, *, split: bool) -> list[str]:
        words: list[str] = []
        cur: list[str] = []
        have = False          # a word started (an empty quoted string is still a word)
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if split and ch.isspace():
                if have:
                    words.append("".join(cur))
                    cur, have = [], False
                i += 1
                continue
            have = True
            if ch == "'":
                j = text.find("'", i + 1)
                if j < 0:
                    raise self._err("unexpected end of statement while looking for matching single-quote")
                cur.append(text[i + 1:j])
                i = j + 1
            elif ch == '"':
                i += 1
                while True:
                    if i >= n:
                        raise self._err("unexpected end of statement while looking for matching double-quote")
                    c = text[i]
                    if c == '"':
                        i += 1
                        break
                    if c == "\\" and i + 1 < n and text[i + 1] in '"$\\':
                        cur.append(text[i + 1])
                        i += 2
                    elif c == "$":
                        val, i = self._var(text, i)
                        cur.append(val)
                    else:
                        cur.append(c)
                        i += 1
            elif ch == "\\":
                if i + 1 < n:
                    cur.append(text[i + 1])
                i += 2
            elif ch == "$":
                val, i = self._var(text, i)
                cur.append(val)
            else:
                cur.append(ch)
                i += 1
        if have:
            words.append("".join(cur))
        return words

    def _var(self, text: str, i: int) -> tuple[str, int]:
        """Expand the variable at text[i] == '$'; returns (value, index after it)."""
        n = len(text)
        if i + 1 >= n:
            return "$", i + 1
        if text[i + 1] != "{":
            j = i + 1
            while j < n and _NAME_CHARS.match(text[j]):
                j += 1
            if j == i + 1:
                return "$", i + 1
            return self.env.get(text[i + 1:j], ""), j
        j = i + 2
        while j < n and _NAME_CHARS.match(text[j]):
            j += 1
        name = text[i + 2:j]
        if not name:
            raise self._err(f"bad substitution in {text!r}")
        if j < n and text[j] == "}":
            return self.env.get(name, ""), j + 1
        op = ""
        if j < n and text[j] == ":":
            op = ":"
            j += 1
        if j >= n or text[j] not in "-+?":
            raise self._err(f"unsupported modifier in {text!r}")
        op += text[j]
        depth, k = 1, j + 1
        while k < n and depth:
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
            k += 1
        if depth:
            raise self._err(f"missing '}}' in {text!r}")
        arg = self.word(text[j + 1:k - 1])
        val = self.env.get(name)
        unset = val is None or (op.startswith(":") and val == "")
        kind = op[-1]
        if kind == "-":
            return (arg if unset else val), k
        if kind == "+":
            return ("" if unset else arg), k
        if unset:
            raise self._err(f"{name}: {arg or 'is not allowed to be unset'}")
        return val, k


def _maybe_json(rest: str) -> list[str] | None:
    """The JSON (exec) form of *rest*, or None for the shell form."""
    if not rest.startswith("["):
        return None
    try:
        v = json.loads(rest)
    except ValueError:
        return None
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    return None


def _name_values(instr: str, rest: str, lex: _Lex) -> list[tuple[str, str]]:
    """ENV / LABEL: ``k=v k2="v 2"``, or the legacy ``KEY value with spaces``."""
    words = _words(rest)
    if not words:
        raise ChangeSyntaxError(f"{instr} requires at least one argument")
    if "=" not in words[0]:
        parts = rest.split(None, 1)
        if len(parts) < 2:
            raise ChangeSyntaxError(f"{instr} must have two arguments")
        pairs = [(parts[0], parts[1])]
    else:
        pairs = []
        for w in words:
            if "=" not in w:
                raise ChangeSyntaxError(f"Syntax error - can't find = in {w!r}. Must be of the form: name=value")
            k, _, v = w.partition("=")
            pairs.append((k, v))
    out = []
    for k, v in pairs:
        key = lex.word(k)
        if not key:
            raise ChangeSyntaxError(f"{instr} names can not be blank")
        out.append((key, lex.word(v)))
    return out


def _ports(words: list[str]) -> list[str]:
    out = []
    for w in words:
        spec, _, proto = w.partition("/")
        proto = (proto or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise ChangeSyntaxError(f"invalid proto: {proto}")
        lo, _, hi = spec.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ChangeSyntaxError(f"invalid containerPort: {spec}")
        a, b = int(lo), int(hi) if hi else int(lo)
        if a > 65535 or b > 65535 or b < a:
            raise ChangeSyntaxError(f"invalid containerPort: {spec}")
        out.extend(f"{p}/{proto}" for p in range(a, b + 1))
    return out


def _workdir(current: str, requested: str) -> str:
    if not requested:
        raise ChangeSyntaxError("WORKDIR requires exactly one argument")
    p = requested if requested.startswith("/") else posixpath.join("/", current or "/", requested)
    p = posixpath.normpath(p)
    return "/" + p.lstrip("/")


def apply_changes(config: Mapping, changes: Sequence[str]) -> dict:
    """The image config's ``config`` object with ``docker commit --change`` instructions applied.

    CMD and ENTRYPOINT take the exec (JSON) or shell form (the image's
    ``Shell``, else ``/bin/sh -c``); an ENTRYPOINT resets CMD unless a CMD came
    before it in the same changes (docker's rule). ENV, LABEL, EXPOSE, USER,
    VOLUME, WORKDIR and STOPSIGNAL expand ``$VAR`` from the image's Env and
    remove quotes as docker's shell-word processing does. Raises
    :class:`ChangeSyntaxError` for anything docker commit would refuse."""
    cfg = copy.deepcopy(dict(config))
    cmd_set = False
    for instr, rest, original in _instructions(changes):
        if instr not in _COMMIT_INSTRUCTIONS:
            if instr in _ALL_INSTRUCTIONS:
                raise ChangeSyntaxError(f"{instr} is not a valid change command")
            raise ChangeSyntaxError(f"unknown instruction: {instr}", hint=ChangeSyntaxError.default_hint)
        env = dict(e.partition("=")[::2] for e in cfg.get("Env") or [] if isinstance(e, str))
        lex = _Lex(env, instr)
        if instr in ("CMD", "ENTRYPOINT"):
            if not rest:
                raise ChangeSyntaxError(f"{instr} requires at least one argument")
            args = _maybe_json(rest)
            if args is None:
                shell = cfg.get("Shell") if isinstance(cfg.get("Shell"), list) and cfg.get("Shell") else None
                args = list(shell or ["/bin/sh", "-c"]) + [rest]
            if instr == "CMD":
                cfg["Cmd"] = args
                cmd_set = True
            else:
                cfg["Entrypoint"] = args
                if not cmd_set:
                    cfg.pop("Cmd", None)
        elif instr == "ENV":
            cur = [e for e in cfg.get("Env") or [] if isinstance(e, str)]
            for key, value in _name_values(instr, rest, lex):
                item = f"{key}={value}"
                for i, e in enumerate(cur):
                    if e.partition("=")[0] == key:
                        cur[i] = item
                        break
                else:
                    cur.append(item)
            cfg["Env"] = cur
        elif instr == "LABEL":
            labels = dict(cfg.get("Labels") or {})
            for key, value in _name_values(instr, rest, lex):
                labels[key] = value
            cfg["Labels"] = labels
        elif instr == "EXPOSE":
            words = lex.words(rest)
            if not words:
                raise ChangeSyntaxError("EXPOSE requires at least one argument")
            ports = dict(cfg.get("ExposedPorts") or {})
            for p in _ports(words):
                ports[p] = {}
            cfg["ExposedPorts"] = ports
        elif instr == "USER":
            words = lex.words(rest)
            if len(words) != 1 or not words[0]:
                raise ChangeSyntaxError("USER requires exactly one argument")
            cfg["User"] = words[0]
        elif instr == "WORKDIR":
            words = lex.words(rest)
            if len(words) != 1:
                raise ChangeSyntaxError("WORKDIR requires exactly one argument")
            cfg["WorkingDir"] = _workdir(cfg.get("WorkingDir") or "", words[0])
        elif instr == "VOLUME":
            vols = _maybe_json(rest)
            if vols is None:
                vols = lex.words(rest)
            if not vols:
                raise ChangeSyntaxError("VOLUME requires at least one argument")
            volumes = dict(cfg.get("Volumes") or {})
            for v in vols:
                v = v.strip()
                if not v:
                    raise ChangeSyntaxError("VOLUME specified can not be an empty string")
                volumes[v] = {}
            cfg["Volumes"] = volumes
        elif instr == "STOPSIGNAL":
            words = lex.words(rest)
            if len(words) != 1:
                raise ChangeSyntaxError("STOPSIGNAL requires exactly one argument")
            sig = words[0]
            name = sig.upper().removeprefix("SIG")
            ok = (sig.isdigit() and 0 < int(sig) <= 64) or name in _SIGNALS or re.fullmatch(r"RTM(IN|AX)([+-]\d+)?", name)
            if not ok:
                raise ChangeSyntaxError(f"invalid signal: {sig}")
            cfg["StopSignal"] = sig
        elif instr == "ONBUILD":
            trigger = rest.split(None, 1)[0].upper() if rest else ""
            if not trigger:
                raise ChangeSyntaxError("ONBUILD requires at least one argument")
            if trigger in ("ONBUILD", "FROM", "MAINTAINER"):
                raise ChangeSyntaxError(f"{trigger} isn't allowed as an ONBUILD trigger")
            if trigger not in _ALL_INSTRUCTIONS:
                raise ChangeSyntaxError(f"unknown instruction: {trigger}")
            cfg["OnBuild"] = list(cfg.get("OnBuild") or []) + [rest]
    return cfg
