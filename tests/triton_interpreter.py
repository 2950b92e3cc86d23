"""Kernel source run by Triton's interpreter on the CPU, in a fresh process (the interpreter is
chosen when Triton is imported): `interpret(code)` runs `code`, which prints one JSON line, and
returns what it printed.

Triton 3.6's interpreter turns a loop bound held in a tensor (a kernel argument, a loaded or
reduced value) into a Python int with `int(array)`, which numpy 2 refuses for its one-element
arrays; the snippet first teaches it `int(array.item())`. The kernels compile as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDEX_SHIM = """
import triton.runtime.interpreter as _interp
if hasattr(_interp, "_patch_lang_tensor"):
    _patch = _interp._patch_lang_tensor
    def _patch_lang_tensor(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    _interp._patch_lang_tensor = _patch_lang_tensor
"""


def interpret(code: str, timeout: float = 900):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", INDEX_SHIM + "import sys; sys.path.insert(0, '.')\n" + code],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
