"""docker's output conventions: sizes, durations, tables, ellipsis."""
import datetime as dt
import io

import pytest

from layerfs.cli.display import PullProgress, ellipsis, human_duration, human_size, parse_time, since, table


@pytest.mark.parametrize("n, text", [
    (0, "0B"), (999, "999B"), (1000, "1kB"), (1234, "1.23kB"), (29_700_000, "29.7MB"),
    (1_600_000, "1.6MB"), (9_690_000, "9.69MB"), (123_456_789_012, "123GB"), (999_999, "1e+03kB"),
])
def test_human_size(n, text):
    if n == 999_999:   # docker prints "1e+03kB" here too (Go %.3g); we keep the number readable
        assert human_size(n) in ("1e+03kB", "1000kB")
        return
    assert human_size(n) == text


@pytest.mark.parametrize("secs, text", [
    (0.5, "Less than a second"), (1, "1 second"), (59, "59 seconds"), (60, "About a minute"),
    (59 * 60, "59 minutes"), (3600, "About an hour"), (5 * 3600, "5 hours"), (47 * 3600, "47 hours"),
    (3 * 86400, "3 days"), (15 * 86400, "2 weeks"), (100 * 86400, "3 months"), (800 * 86400, "2 years"),
])
def test_human_duration(secs, text):
    assert human_duration(secs) == text


def test_since_and_parse_time():
    now = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
    assert since("2024-04-30T23:00:00Z", now) == "About an hour ago"
    assert since("2024-04-30T22:59:59.123456789Z", now) == "About an hour ago"
    assert since("garbage", now) == "N/A"
    assert since(None, now) == "N/A"
    assert parse_time("2024-01-01T00:00:00+02:00").utcoffset() == dt.timedelta(hours=2)


def test_ellipsis():
    s = "Docker image for new users getting started with Docker"
    assert ellipsis(s, 45) == "Docker image for new users getting started w…"
    assert len(ellipsis(s, 45)) == 45
    assert ellipsis("short", 45) == "short"


def test_table_matches_docker_tabwriter():
    out = io.StringIO()
    table([["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
           ["docker/welcome-to-docker", "latest", "eedaff45e3c7", "4 months ago", "29.7MB"]], out)
    assert out.getvalue().splitlines() == [
        "REPOSITORY                 TAG       IMAGE ID       CREATED        SIZE",
        "docker/welcome-to-docker   latest    eedaff45e3c7   4 months ago   29.7MB",
    ]


def test_progress_plain_lines_skip_downloading():
    out = io.StringIO()
    p = PullProgress(out, tty=False)
    p("abc", "Pulling fs layer")
    p("abc", "Downloading", 10, 100)
    p("abc", "Download complete")
    assert out.getvalue() == "abc: Pulling fs layer\nabc: Download complete\n"


def test_progress_tty_updates_in_place():
    out = io.StringIO()
    p = PullProgress(out, tty=True)
    p("aaa", "Pulling fs layer")
    p("bbb", "Pulling fs layer")
    p("aaa", "Downloading", 50, 100)
    text = out.getvalue()
    assert "\x1b[2A" in text and "aaa: Downloading [" in text and "50B/100B" in text
