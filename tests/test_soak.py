"""A one-minute soak of `shardrt serve` (scripts/soak_serve.py; the 20-minute run is in the README):
every client's request kind works under load, a daemon killed midway fails only what it must and
the server restarts, steady memory holds, and SIGTERM leaves nothing behind."""

from __future__ import annotations

import json

from .test_bench_scripts import run_script


def test_one_minute_soak_with_a_daemon_killed():
    report = json.loads(run_script("soak_serve.py", "--minutes", "1", "--clients", "3", timeout=600))
    assert report["exit_status"] == 0 and report["restarts"] == 1 and report["restart_s"] is not None
    assert report["errors"] == {}, report["errors"]  # only the requests the kill explains may fail
    assert all(report["ok"][kind] >= 3 for kind in ("stream", "plain", "cancel", "bad")), report["ok"]
    assert report["left_behind"] == {"processes": [], "segments": [], "runtime": []}
    assert all(g <= 0.05 for g in report["rss_growth"]["steady"].values()), report["rss_growth"]
