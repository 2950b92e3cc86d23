"""A one-minute soak of `shardrt serve` (scripts/soak_serve.py; the 20-minute run is in the README):
every client's request kind works under load, a daemon killed midway fails only what it must and
the server restarts, steady memory holds, and SIGTERM leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys

from .test_bench_scripts import SCRIPTS


def test_one_minute_soak_with_a_daemon_killed():
    done = subprocess.run([sys.executable, str(SCRIPTS / "soak_serve.py"), "--minutes", "1", "--clients", "3"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    # the server's own stderr (it shares the script's) says why, if it did not stop cleanly
    assert report["exit_status"] == 0 and report["restarts"] == 1 and report["restart_s"] is not None, \
        (report.get("exit_status"), done.stderr[-3000:])
    assert report["errors"] == {}, report["errors"]  # only the requests the kill explains may fail
    assert all(report["ok"][kind] >= 3 for kind in ("stream", "plain", "cancel", "bad")), report["ok"]
    assert report["left_behind"] == {"processes": [], "segments": [], "runtime": []}
    assert all(g <= 0.05 for g in report["rss_growth"]["steady"].values()), report["rss_growth"]
