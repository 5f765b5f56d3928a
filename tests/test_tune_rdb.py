"""mupt tune on RDB storages with worker processes that die: a real PostgreSQL server and SQLite.

Two ``mupt tune --workers 2`` processes share one study, as two machines would; one worker is
killed with SIGKILL in the middle of a trial.  Its trial must be failed by the heartbeat check and
retried with the same parameters, and the study must end with exactly the requested number of
complete trials: none lost, none duplicated.

The PostgreSQL server is Debian's ``postgresql`` package (``.ci/run`` installs it); the fixture
runs ``initdb`` + ``pg_ctl`` on a temporary data directory and a free loopback port, as the
``postgres`` user when the tests run as root (the server refuses root).  A missing server is a
test FAILURE that says how to install it, never a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mupt.tune import sqlalchemy_url, was_skipped

# Optuna >= 4.9 names it RetryHeartbeatStaleTrialCallback (the old name warns)
Retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
ROOT = Path(__file__).resolve().parent.parent
BACKEND = "torch"
TRIALS = 6
HEARTBEAT = 2  # seconds; a dead worker's trial is failed after 2 x HEARTBEAT without a beat
# trials at rung 0 (d_model 16) train 90 steps, about 1 s on one core (plus ~5 s of torch imports in a worker's
# first), validated every 10 steps: a trial validated at step 10 but not yet at 60 has at least 30 steps
# (~0.3 s) left, enough to kill its worker mid-trial (with 30-step trials, 10..30, a trial sometimes ended
# before the kill); the LR range never diverges (every trial completes)
STEPS, KILL_BEFORE = 90, 60
FLAGS = [
    "--width", "32", "--layers", "1", "--seq-len", "32", "--steps", str(STEPS), "--eval-every", "10",
    "--lr-range", "2e-3,2e-2", "--backend", BACKEND, "--pruner", "none", "--trials", str(TRIALS), "--workers", "2",
    "--heartbeat", str(HEARTBEAT), "--study", "shared",
]  # fmt: skip
INSTALL = "install it: `apt-get update && apt-get install -y postgresql` on Debian/Ubuntu (.ci/run does this)"


# --- a throw-away PostgreSQL server ----------------------------------------------------------------


def pg_bindir() -> Path | None:
    """Directory holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<ver>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """URL of a fresh database on a private PostgreSQL server, stopped and deleted afterwards."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.fail(f"PostgreSQL server not found (no initdb/pg_ctl on PATH or in /usr/lib/postgresql); {INSTALL}")
    try:
        import psycopg2  # noqa: F401  (the driver SQLAlchemy uses for postgresql:// URLs)
    except ImportError:
        pytest.fail("psycopg2 missing: pip install psycopg2-binary (declared in the dev and postgres extras)")
    run_as: list[str] = []
    datadir = Path(tempfile.mkdtemp(prefix="mupt-pg-"))  # not under pytest's 0700 tmp: the server user reads it
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres system user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(f"running as root but there is no 'postgres' system user; {INSTALL}")
        os.chown(datadir, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=120, cwd=datadir)

    try:
        init = pg(str(bindir / "initdb"), "-D", str(datadir / "data"), "-U", "mupt", "--auth=trust", "--no-sync")
        assert init.returncode == 0, f"initdb failed: {init.stderr[-2000:]}"
        start = pg(
            str(bindir / "pg_ctl"), "-D", str(datadir / "data"), "-l", str(datadir / "server.log"), "-w", "start",
            "-o", f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 -c fsync=off",
        )  # fmt: skip
        log = (datadir / "server.log").read_text() if (datadir / "server.log").is_file() else ""
        assert start.returncode == 0, f"pg_ctl start failed: {start.stderr[-1000:]} {log[-2000:]}"
        made = pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mupt", "mupt")
        assert made.returncode == 0, f"createdb failed: {made.stderr[-1000:]}"
        yield f"postgresql://mupt@127.0.0.1:{port}/mupt"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(datadir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(datadir, ignore_errors=True)


# --- two groups of two workers, one killed -------------------------------------------------------------


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def children(pid: int) -> set[int]:
    try:
        return {int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def run_two_machines(url: str, runs_dir: Path) -> dict[str, object]:
    """Start two `mupt tune --workers 2` groups on ``url``, SIGKILL one worker mid-trial, wait for both.

    Returns what happened: the killed trial's number and worker pid, each group's exit code and
    stderr, and each group's worker pids.
    """
    storage = optuna.storages.RDBStorage(sqlalchemy_url(url))  # what mupt opens too
    groups = [
        subprocess.Popen(
            [sys.executable, "-m", "mupt", "tune", *FLAGS, "--storage", url, "--runs-dir", str(runs_dir / name)],
            cwd=ROOT,
            env=env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for name in ("machine-a", "machine-b")
    ]
    pids: list[set[int]] = [set(), set()]
    victim: tuple[int, int] | None = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and any(g.poll() is None for g in groups):
            for i, g in enumerate(groups):
                pids[i] |= children(g.pid)
            if victim is None:
                try:
                    study = optuna.load_study(study_name="shared", storage=storage)
                except KeyError:  # not created yet
                    time.sleep(0.2)
                    continue
                running = [
                    t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if "worker" in t.user_attrs
                ]  # fmt: skip
                # mid-trial: validated at step 10, not yet at KILL_BEFORE
                middle = [t for t in running if t.intermediate_values and max(t.intermediate_values) < KILL_BEFORE]
                if middle:
                    t = middle[0]
                    pid = int(str(t.user_attrs["worker"]).rsplit(":", 2)[1])
                    if any(pid in p for p in pids):
                        os.kill(pid, signal.SIGKILL)
                        victim = (t.number, pid)
                        state = storage.get_trial(t._trial_id).state
                        assert state is TrialState.RUNNING, f"trial {t.number} ended ({state}) before the kill"
            time.sleep(0.1)
        outs = [g.communicate(timeout=max(1.0, deadline - time.monotonic())) for g in groups]
    finally:
        for g in groups:
            if g.poll() is None:
                g.kill()
                g.wait()
    assert victim is not None, "no trial was caught between its validations; nothing was killed"
    return {
        "victim": victim[0], "victim_pid": victim[1], "codes": [g.returncode for g in groups],
        "stderr": [o[1] for o in outs], "pids": pids,
    }  # fmt: skip


def check_study(url: str, happened: dict[str, object]) -> int:
    """Exactly TRIALS complete trials, the killed one failed by heartbeat and retried once, none duplicated."""
    victim = happened["victim"]
    codes, stderr, pids = happened["codes"], happened["stderr"], happened["pids"]
    assert isinstance(codes, list) and isinstance(stderr, list) and isinstance(pids, list)
    killed_group = next(i for i, p in enumerate(pids) if happened["victim_pid"] in p)
    # the group that lost a worker says so (exit 2, one line); the other ends normally
    assert codes[1 - killed_group] == 0, stderr[1 - killed_group][-3000:]
    assert codes[killed_group] == 2 and "1 of 2 worker processes failed" in stderr[killed_group], stderr[killed_group]

    study = optuna.load_study(study_name="shared", storage=optuna.storages.RDBStorage(sqlalchemy_url(url)))
    trials = study.get_trials(deepcopy=False)
    table = [
        (t.number, t.state.name, t.duration, t.user_attrs.get("reason"), Retry.retried_trial_number(t)) for t in trials
    ]
    by_state = {s: [t for t in trials if t.state is s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == TRIALS, table  # none lost, no overshoot
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    # only the killed trial failed, plus any twin retry that was closed before it trained (SQLite can queue
    # the retry twice: two workers fail the same stale trial at once; only the first twin runs), and any trial a
    # worker closed unrun because the budget filled while it was created ("over budget": the race the budget
    # check closes; no training, no cost)
    twins = [t for t in by_state[TrialState.FAIL] if str(t.user_attrs.get("reason")).startswith("duplicate retry")]
    skipped = [t for t in by_state[TrialState.FAIL] if was_skipped(t)]
    assert all(not t.intermediate_values and "steps" not in t.user_attrs for t in skipped), table
    assert [t.number for t in by_state[TrialState.FAIL] if t not in skipped] == [victim], table
    failed = trials[victim]
    retries = [t for t in trials if Retry.retried_trial_number(t) == victim and t not in skipped]
    assert len(retries) == 1 and retries[0].state is TrialState.COMPLETE, table
    assert retries[0].params == failed.params  # the retry repeats the killed trial's parameters
    # none duplicated: every complete trial is a distinct point, and each was run by exactly one worker
    points = [tuple(sorted(t.params.items())) for t in by_state[TrialState.COMPLETE]]
    assert len(set(points)) == TRIALS
    owners = [int(str(t.user_attrs["worker"]).rsplit(":", 2)[1]) for t in by_state[TrialState.COMPLETE]]
    assert happened["victim_pid"] not in owners
    # both machines did work
    assert all(any(o in p for o in owners) for p in pids), (owners, pids)
    return len(twins)


def test_postgres_two_machines_survive_a_killed_worker(postgres_url: str, tmp_path: Path) -> None:
    happened = run_two_machines(postgres_url, tmp_path)
    check_study(postgres_url, happened)


def test_sqlite_one_machine_survives_a_killed_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    happened = run_two_machines(url, tmp_path)
    check_study(url, happened)
