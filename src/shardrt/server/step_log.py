"""`--step-log FILE`: one JSON line per batched step and per request, to see where a request's time
goes under load (a burst that waits behind its own prefill, a step that settles many slots).

    {"step": 12, "t": 3.2104, "settle_ms": 1.9, "settle_cpu_ms": 1.7, "drain_ms": 0.0, "decode": 28,
     "prefill": 312, "prompts": 36, "joined": 36, "finished": 0, "forward_ms": 21.0, "ms": 24.7}
    {"request": 7, "tokenize_ms": 1.6, "admitted_ms": 4.0, "first_token_ms": 61.2, "total_ms": 702.5,
     "prompt_tokens": 1082, "reused": 1065, "tokens": 64, "finish": "length", "http_cpu_ms": 0.9}

`t` is seconds since the log opened (time.monotonic). A request's line is written when it ends,
numbered in the order requests took their slots; its times are milliseconds after it entered the
queue (tokenized): `admitted_ms` when it took a slot, `first_token_ms` when its first token was
sampled, `total_ms` when it ended; `tokenize_ms` is how long it took to get there from its parsed
body (the chat template, then the encoding, batched with other requests' under a burst), and
`http_cpu_ms` the CPU time its HTTP thread spent from the request line to the queue (headers,
body, template, encoding): under a burst, 64 threads' worth of it holds the GIL that the engine
thread needs too. A step's
`ms` is the wall time of `BatchScheduler.step` (settle, the forwards put in flight, and those that
came back), `settle_ms` the part that set slots up and gave them back (`drain_ms` of it waiting
for the forwards in flight to come back first; `settle_cpu_ms` the engine thread's CPU time in it:
far below settle_ms, the thread waited, for the GIL that the HTTP threads hold under a burst, say),
`forward_ms` the time the stages' forwards took that came back in this step (on a GPU up to their
results on the host; a daemon's, from its request to its reply, which may span steps). With the
model in this process, ms - settle_ms - forward_ms is the scheduler's own host work.
Only the engine thread writes; lines are flushed as they are written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConfigError


class StepLog:
    def __init__(self, path: str | Path):
        try:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the server's life
        except OSError as exc:
            raise ConfigError(f"--step-log: cannot write {str(path)!r}: {exc.strerror}") from None
        self._start = time.monotonic()
        self.steps = 0

    def step(self, **fields) -> None:
        self.steps += 1
        self._write({"step": self.steps, "t": round(time.monotonic() - self._start, 4), **fields})

    def request(self, number: int, *, received: float, arrived: float, admitted: float | None,
                first_token: float | None, **fields) -> None:
        """A request that ended; the times are time.monotonic() readings."""
        def after(t):
            return None if t is None else round((t - arrived) * 1e3, 2)

        self._write({"request": number, "tokenize_ms": round((arrived - received) * 1e3, 2),
                     "admitted_ms": after(admitted), "first_token_ms": after(first_token),
                     "total_ms": after(time.monotonic()), **fields})

    def _write(self, line: dict) -> None:
        try:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()
        except (OSError, ValueError):  # a full disk or a closed file costs the log, never a request
            pass

    def close(self) -> None:
        self._file.close()
