"""Package layering: jobs (and what they import) never pull in the serving planes, so there is no
cycle serving.http -> jobs -> serving; the token check both use lives in cellfeed.server.auth."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import pkgutil, importlib, sys
import cellfeed.server.jobs as jobs
names = [m.name for m in pkgutil.iter_modules(jobs.__path__, "cellfeed.server.jobs.")]
for name in names:
    importlib.import_module(name)
print(len(names))
print(" ".join(sorted(m for m in sys.modules if m.startswith("cellfeed.server.serving"))))
"""


def test_importing_every_jobs_module_imports_nothing_of_serving():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, serving = (done.stdout.splitlines() + [""])[:2]
    assert int(count) >= 6  # api, service, work, executor, models, store, ...
    assert serving == "", f"importing cellfeed.server.jobs imported {serving}"
