"""Output the way docker shows it: sizes, durations, tables, pull progress."""
from __future__ import annotations

import datetime as _dt
import json
import re
import sys
import threading
from typing import Sequence, TextIO

from layerfs.errors import UsageError

_DECIMAL_UNITS = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]


def _fmt_g(value: float, precision: int) -> str:
    """Go's %.*g (no exponent for our ranges, trailing zeros dropped)."""
    s = f"{value:.{precision}g}"
    if "e" in s:  # e.g. 1e+03 never happens below 1000, but be safe
        s = f"{value:.0f}"
    return s


def human_size(size: float, precision: int = 3) -> str:
    """docker's units.HumanSizeWithPrecision: decimal units, 3 significant digits."""
    i = 0
    size = float(size)
    while size >= 1000.0 and i < len(_DECIMAL_UNITS) - 1:
        size /= 1000.0
        i += 1
    return _fmt_g(size, precision) + _DECIMAL_UNITS[i]


def human_duration(seconds: float) -> str:
    """docker's units.HumanDuration."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600 / 24 / 365)} years"


def parse_time(text: str | None) -> _dt.datetime | None:
    """Parse an RFC 3339 timestamp as found in image configs (nanoseconds allowed)."""
    if not text or not isinstance(text, str):
        return None
    t = text.strip()
    if t.endswith("Z") or t.endswith("z"):
        t = t[:-1] + "+00:00"
    if "." in t:  # trim fractional seconds to microseconds
        head, _, rest = t.partition(".")
        frac = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            frac += rest[i]
            i += 1
        t = head + "." + (frac[:6] or "0") + rest[i:]
    try:
        d = _dt.datetime.fromisoformat(t)
    except ValueError:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d


def since(text: str | None, now: _dt.datetime | None = None) -> str:
    d = parse_time(text)
    if d is None or d.year <= 1:
        return "N/A"
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return human_duration((now - d).total_seconds()) + " ago"


def ellipsis(text: str, width: int) -> str:
    """docker's formatter.Ellipsis: cut to *width* characters ending in '…'."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    return text[: width - 1] + "…"


def table(rows: Sequence[Sequence[str]], out: TextIO, *, minwidth: int = 10, padding: int = 3) -> None:
    """A text/tabwriter table as docker's CLI formats them (minwidth 10, padding 3)."""
    if not rows:
        return
    ncol = max(len(r) for r in rows)
    widths = [0] * ncol
    for r in rows:
        for i, cell in enumerate(r[:-1] if len(r) == ncol else r):
            widths[i] = max(widths[i], len(cell))
    for r in rows:
        cells = []
        for i, cell in enumerate(r):
            if i == len(r) - 1:
                cells.append(cell)
            else:
                cells.append(cell.ljust(max(minwidth, widths[i] + padding)))
        out.write("".join(cells).rstrip() + "\n")


# --- pull progress -----------------------------------------------------------------

_QUIET_STATUSES = {"Downloading", "Waiting"}


def progress_bar(current: int, total: int, width: int = 50) -> str:
    if total <= 0:
        return ""
    filled = min(width, int(width * current / total))
    arrow = ">" if filled < width else ""
    return "[" + "=" * max(0, filled - (1 if arrow else 0)) + arrow + " " * (width - filled) + "]"


class PullProgress:
    """Docker-style per-layer lines: live, updated in place, on a terminal; plain lines otherwise."""

    def __init__(self, out: TextIO | None = None, *, tty: bool | None = None):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._order: list[str] = []
        self._lines: dict[str, str] = {}

    def message(self, text: str) -> None:
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()

    def __call__(self, layer: str, status: str, current: int | None = None, total: int | None = None) -> None:
        text = status
        if status == "Downloading" and current is not None and total:
            text = f"Downloading {progress_bar(current, total)} {human_size(current)}/{human_size(total)}"
        with self._lock:
            if not self.tty:
                if status in _QUIET_STATUSES:
                    return
                self.out.write(f"{layer}: {text}\n")
                self.out.flush()
                return
            if layer not in self._lines:
                self._order.append(layer)
                self._lines[layer] = text
                self.out.write(f"{layer}: {text}\n")
            else:
                if status == "Downloading" and self._lines[layer] == text:
                    return
                self._lines[layer] = text
                up = len(self._order) - self._order.index(layer)
                self.out.write(f"\x1b[{up}A\r\x1b[2K{layer}: {text}\r\x1b[{up}B")
            self.out.flush()


def render_template(template: str, doc) -> str:
    """A small subset of Go templates as docker's ``--format`` uses them:
    ``{{.Field.Sub}}``, ``{{json .Field}}`` and ``{{index .Map "key"}}``."""

    def lookup(path: str):
        cur = doc
        for part in [p for p in path.strip().lstrip(".").split(".") if p]:
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                raise UsageError(f"template: no field {part!r} in {path!r}")
        return cur

    def render(m: re.Match) -> str:
        expr = m.group(1).strip()
        if expr.startswith("json "):
            return json.dumps(lookup(expr[5:]), separators=(",", ":"))
        im = re.fullmatch(r'index\s+(\.\S*)\s+"([^"]*)"', expr)
        if im:
            v = lookup(im.group(1))
            v = v.get(im.group(2)) if isinstance(v, dict) else None
        elif expr == ".":
            v = doc
        else:
            v = lookup(expr)
        if isinstance(v, (dict, list)):
            return json.dumps(v, separators=(",", ":"))
        return "<no value>" if v is None else str(v)

    return re.sub(r"\{\{(.*?)\}\}", render, template)
