"""Two workers, as on two machines, share one tuning study on a real PostgreSQL server.

``.ci/run`` starts a throwaway server on 127.0.0.1 (``.ci/postgres.sh``) and exports its URL as
``NAS_GROUPING_TEST_POSTGRES``; ``make test-postgres`` does the same for a developer. Without
the URL the test fails under CI (``CI=true``) and is skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

URL = os.environ.get("NAS_GROUPING_TEST_POSTGRES")
REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys, torch
torch.set_num_threads(1)
from nas_grouping.config import SearchConfig, TuneConfig
from nas_grouping.data import DataConfig
from nas_grouping.tune.study import tune
out, url, name = sys.argv[1:4]
cfg = SearchConfig(space="digits_convnet", space_kwargs={"widths": [8, 8, 16, 16, 16, 16]}, epochs=2,
                   warmup_epochs=1, finetune_epochs=0, budget=0.5, progress=False, out=out,
                   data=DataConfig(batch_size=128), measure_latency=False)
result = tune(cfg, TuneConfig(trials=6, storage=url, study_name=name, startup_trials=2,
                                         pruner="none"), quiet=True)
print("RESULT", json.dumps(result.summary["trials"]))
"""


@pytest.fixture
def postgres_url() -> str:
    if URL:
        return URL
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI must run the PostgreSQL tuning test: NAS_GROUPING_TEST_POSTGRES is not set (.ci/run starts "
                    "a server with .ci/postgres.sh and exports it)")
    pytest.skip("no PostgreSQL server: set NAS_GROUPING_TEST_POSTGRES (make test-postgres starts one)")


@pytest.mark.slow
def test_two_workers_on_postgresql_share_a_study_without_losing_or_duplicating_trials(tmp_path, postgres_url):
    import optuna
    from optuna.trial import TrialState

    name = f"pg-test-{uuid.uuid4().hex[:8]}"
    code = WORKER if _has_latency_field() else WORKER.replace(", measure_latency=False", "")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"machine{i}"), postgres_url, name],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=540) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "RESULT" in out
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))  # none lost, none extra
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 6  # no duplicated sample
    hosts = {t.user_attrs["worker"] for t in trials}
    assert len(hosts) == 2  # both workers ran trials
    for t in trials:  # each trial's run folder is on the machine that ran it
        ran_on = [m for m in ("machine0", "machine1") if (tmp_path / m / t.user_attrs["run_dir"] / "model").is_dir()]
        assert len(ran_on) == 1
    summaries = [json.loads((tmp_path / f"machine{i}" / "summary.json").read_text()) for i in range(2)]
    best = min(trials, key=lambda t: (-t.user_attrs["val_acc"], t.user_attrs["macs"], t.number))
    assert best.number in {s["best"]["number"] for s in summaries}  # the worker that finished last saw it
    assert all("***" in s["storage"] and postgres_url.split("@")[0].split(":")[-1] not in s["storage"]
               for s in summaries)


def _has_latency_field() -> bool:
    from nas_grouping.config import SearchConfig

    return "measure_latency" in SearchConfig.__dataclass_fields__
