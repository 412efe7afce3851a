"""Fault cases of the storage layer: concurrent writers, files appearing mid-run, replacement, SIGKILL at each
point of a publish (local, GCS emulator, S3 emulator), stale temps and locks, a full disk, unwritable places.

Every case asserts the error (type and one-line message naming the path) and what is left on disk or in the
bucket. Kills are real: a child process publishes with one backend call wrapped to SIGKILL itself at that point.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from synthehr_core import storage
from synthehr_core.errors import (IncompleteOutputError, OutputExistsError, OutputLockedError, StorageError,
                                  SynthEHRError)
from synthehr_core.storage import publish
from synthehr_core.storage.backends import backend

# A publisher that SIGKILLs itself at one point: argv = out, point, [--overwrite]. It writes part0..2.parquet and
# meta.json; "hold" prints "ready" inside the block and publishes once stdin closes.
CHILD = r'''
import os, signal, sys
from pathlib import Path
from synthehr_core import storage
from synthehr_core.storage import backends, publish

out, point = sys.argv[1], sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
cls = type(backends.backend(out))
up, wr, rm, ren = cls.upload_file, cls.write, cls.delete, os.rename
count = {"up": 0}

def upload_file(self, local, path):
    if point == "mid-upload" and count["up"] == 1 or point == "before-success" and path.endswith("/_SUCCESS"):
        die()
    count["up"] += 1
    return up(self, local, path)

def write(self, path, data):
    wr(self, path, data)
    if point == "before-files" and path.endswith("/_IN_PROGRESS"):
        die()

def delete(self, path):
    if point == "before-unmark" and path.endswith("/_IN_PROGRESS"):
        die()
    rm(self, path)
    if point == "replacing" and path.endswith("/_SUCCESS"):
        die()

def rename(a, b):
    ren(a, b)
    if point == "between-renames" and ".old-" in str(b):
        die()

cls.upload_file, cls.write, cls.delete, os.rename = upload_file, write, delete, rename
if point == "between-renames":
    publish._exchange = lambda a, b: False
with storage.atomic_dir(out, overwrite="--overwrite" in sys.argv) as tmp:
    for i in range(3):
        (tmp / f"part{i}.parquet").write_bytes(b"new" * (i + 1))
    (tmp / "meta.json").write_bytes(b'{"run": "child"}')
    if point == "staging":
        die()
    if point == "hold":
        print("ready", flush=True)
        sys.stdin.read()
print("published", flush=True)
'''
NEW = ["_SUCCESS", "meta.json", "part0.parquet", "part1.parquet", "part2.parquet"]
INCOMPLETE = r"incomplete output, written by a run that did not finish \(no _SUCCESS\): rerun the test stage"


def child(out, point, *flags, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out), point, *flags], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def killed(out, point, *flags) -> None:
    proc = child(out, point, *flags)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]


def publish_files(out, files: dict[str, bytes], overwrite=False) -> None:
    with storage.atomic_dir(out, overwrite=overwrite) as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)


def ls(out) -> list[str]:
    return storage.listdir(out) if storage.exists(out) else []


@pytest.fixture(params=["local", "gs", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue({"gs": "gcs", "s3": "s3"}[request.param]) + f"/{uuid.uuid4().hex[:8]}/out"


@pytest.fixture(params=["gs", "s3"])
def remote(request):
    return request.getfixturevalue({"gs": "gcs", "s3": "s3"}[request.param]) + f"/{uuid.uuid4().hex[:8]}/out"


# ------------------------------------------------------------------------------------------ concurrent writers
def test_second_writer_fails_at_once_and_the_first_output_is_intact(where):
    first = child(where, "hold")
    try:
        assert first.stdout.readline().strip() == "ready", first.stderr.read()[-2000:]
        t = time.perf_counter()
        with pytest.raises(OutputLockedError, match=rf"^{where}: another synthehr run is writing here \(lock "
                                                    rf".*\.out\.lock held by pid {first.pid} on "
                                                    rf"{socket.gethostname()} since "):
            publish_files(where, {"meta.json": b'{"run": "second"}'})
        assert time.perf_counter() - t < 5
        with pytest.raises(OutputLockedError, match="another synthehr run is writing here"):
            storage.check_output(where, overwrite=True)                  # overwrite does not beat a lock
    finally:
        out, err = first.communicate("", timeout=60)
    assert first.returncode == 0 and out.strip() == "published", err[-2000:]
    assert ls(where) == NEW and storage.read_json(storage.join(where, "meta.json")) == {"run": "child"}
    storage.require_complete(where, "test")
    assert not storage.exists(storage.lock_path(where))


def test_two_racing_children_one_wins_whole(where):
    if where.startswith("gs://"):
        # Exclusive creation is the server's job (if_generation_match=0); gcp-storage-emulator ignores the
        # precondition, so two children that create the lock in the same instant can both believe they hold it.
        # Real GCS refuses the second create. The sequential case (a held lock refuses the second writer) runs on
        # the emulator in test_second_writer_fails_at_once_and_the_first_output_is_intact[gs].
        pytest.skip("gcp-storage-emulator does not enforce if_generation_match=0; a simultaneous race needs real GCS")
    procs = [child(where, "hold") for _ in range(2)]
    outs = []
    for p in procs:
        outs.append(p.communicate("", timeout=60))
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], [o[1][-800:] for o in outs]
    loser = next(o for p, o in zip(procs, outs) if p.returncode == 1)
    assert "another synthehr run is writing here" in loser[1] or "already exists" in loser[1]
    assert ls(where) == NEW
    storage.require_complete(where, "test")


# ------------------------------------------------------------------------------------------ the user's files
def test_a_file_appearing_during_the_run_is_kept(where):
    proc = child(where, "hold")
    assert proc.stdout.readline().strip() == "ready"
    storage.write_bytes(storage.join(where, "notes.txt"), b"the user's")
    _, err = proc.communicate("", timeout=60)
    assert proc.returncode == 1
    assert f"{where}: files synthehr did not write (notes.txt) appeared there while this run was writing: they " \
           "were kept and this run's output was discarded" in err
    assert ls(where) == ["notes.txt"] and storage.read_bytes(storage.join(where, "notes.txt")) == b"the user's"
    assert not storage.exists(storage.lock_path(where))


def test_a_finished_output_appearing_during_the_run_is_kept(where):
    proc = child(where, "hold")
    assert proc.stdout.readline().strip() == "ready"
    lock = storage.lock_path(where)
    held = storage.read_bytes(lock)
    backend(lock).delete(lock)                              # someone else's run took its place and finished
    publish_files(where, {"meta.json": b'{"run": "other"}'})
    storage.write_bytes(lock, held)
    _, err = proc.communicate("", timeout=60)
    assert proc.returncode == 1 and "a finished synthehr output" in err and "appeared there" in err
    assert storage.read_json(storage.join(where, "meta.json")) == {"run": "other"}


def test_foreign_files_are_refused_before_any_work(where):
    storage.write_bytes(storage.join(where, "data.csv"), b"a,b\n")
    with pytest.raises(OutputExistsError, match=rf"^{where} already exists and is not empty: it holds files "
                                                r"synthehr did not write \(data.csv\)"):
        storage.check_output(where)
    proc = child(where, "hold")
    _, err = proc.communicate("", timeout=60)
    assert proc.returncode == 1 and "files synthehr did not write" in err
    assert ls(where) == ["data.csv"]


def test_overwrite_replaces_and_leaves_nothing_else(where):
    publish_files(where, {"old.parquet": b"old", "meta.json": b"{}"})
    proc = child(where, "none", "--overwrite")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert ls(where) == NEW
    storage.require_complete(where, "test")
    if not storage.is_remote(where):
        assert sorted(os.listdir(Path(where).parent)) == ["out"]


def test_overwrite_without_atomic_exchange(tmp_path, monkeypatch):
    out = tmp_path / "out"
    publish_files(out, {"old": b"1"})
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    publish_files(out, {"new": b"2"}, overwrite=True)
    assert sorted(os.listdir(out)) == ["_SUCCESS", "new"] and sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------------------ SIGKILL mid-publish
@pytest.mark.parametrize("point", ["before-files", "mid-upload", "before-success"])
def test_killed_upload_is_refused_by_readers_and_replaced_by_a_rerun(remote, point):
    killed(remote, point)
    assert "_IN_PROGRESS" in ls(remote) and "_SUCCESS" not in ls(remote)
    with pytest.raises(IncompleteOutputError, match=rf"^{remote}: {INCOMPLETE}"):
        storage.require_complete(remote, "test")
    with pytest.raises(IncompleteOutputError, match=INCOMPLETE):
        storage.require_complete(storage.join(remote, "meta.json"), "test")
    storage.check_output(remote)                       # a retry may go there without overwrite
    proc = child(remote, "none")                       # the dead child's lock is stale (its pid is gone)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert ls(remote) == NEW and not storage.exists(storage.lock_path(remote))
    storage.require_complete(remote, "test")


def test_killed_after_success_is_complete(remote):
    killed(remote, "before-unmark")
    assert ls(remote) == ["_IN_PROGRESS", *NEW]
    storage.require_complete(remote, "test")           # _SUCCESS was written: every file is there
    with pytest.raises(OutputExistsError, match="a finished synthehr output"):
        storage.check_output(remote)


def test_killed_while_replacing_is_incomplete_then_replaced(remote):
    publish_files(remote, {"old.parquet": b"old"})
    killed(remote, "replacing", "--overwrite")
    with pytest.raises(IncompleteOutputError, match=INCOMPLETE):
        storage.require_complete(remote, "test")
    killed_then = ls(remote)
    assert "_SUCCESS" not in killed_then and "_IN_PROGRESS" in killed_then
    publish_files(remote, {"meta.json": b"{}"})        # no overwrite needed for an incomplete output
    assert ls(remote) == ["_SUCCESS", "meta.json"]


def test_killed_local_staging_leaves_no_output_and_the_rerun_cleans_up(tmp_path, caplog):
    out = tmp_path / "out"
    killed(out, "staging")
    left = sorted(os.listdir(tmp_path))
    assert left[0] == ".out.lock" and left[1].startswith(".out.tmp-") and len(left) == 2
    with pytest.raises(SynthEHRError, match="not a tables directory"):
        __import__("synthehr_core.data.schema", fromlist=["read_tables"]).read_tables(out)
    with caplog.at_level(logging.WARNING, logger="synthehr_core.storage.publish"):
        publish_files(out, {"meta.json": b"{}"})
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert any("removing the stale lock" in r.message for r in caplog.records)
    assert any(f"removed {tmp_path / left[1]}" in r.getMessage() and "died before publishing" in r.getMessage()
               for r in caplog.records)


def test_killed_between_the_two_renames_keeps_both_and_restores_the_old(tmp_path, caplog):
    out = tmp_path / "out"
    publish_files(out, {"old.parquet": b"old"})
    killed(out, "between-renames", "--overwrite")
    left = sorted(os.listdir(tmp_path))
    assert "out" not in left and any(n.startswith(".out.old-") for n in left)
    assert any(n.startswith(".out.tmp-") for n in left)                    # both versions are on disk
    with caplog.at_level(logging.WARNING, logger="synthehr_core.storage.publish"):
        with pytest.raises(OutputExistsError, match="a finished synthehr output"):
            publish_files(out, {"x": b"1"})                                 # the old one is back in place
    assert sorted(os.listdir(out)) == ["_SUCCESS", "old.parquet"]
    assert any("restored the previous output" in r.getMessage() for r in caplog.records)
    publish_files(out, {"x": b"1"}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------------------ temps and locks
def test_stale_temp_of_a_dead_pid_is_removed(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abcd1234"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "x").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="synthehr_core.storage.publish"):
        publish_files(tmp_path / "out", {"a": b"1"})
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == ["out"]
    assert any(f"left by pid {dead} that died" in r.getMessage() for r in caplog.records)


def test_temp_of_a_live_run_and_legacy_temps_are_left_alone(tmp_path, caplog):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.tmp-{sleeper.pid}-abcd1234"
        legacy = tmp_path / ".out.tmp-1a2b3c4d"
        live.mkdir(), legacy.mkdir()
        with caplog.at_level(logging.WARNING, logger="synthehr_core.storage.publish"):
            publish_files(tmp_path / "out", {"a": b"1"})
        assert live.exists() and legacy.exists()
        assert sum("left" in r.getMessage() and "alone" in r.getMessage() for r in caplog.records) == 2
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_another_host_is_stale_only_after_its_heartbeat_stops(where, monkeypatch):
    lock = storage.lock_path(where)
    fresh = {"pid": 7, "host": "pod-a", "since": "2026-12-01T00:00:00Z", "heartbeat": time.time()}
    storage.write_json(lock, fresh)
    with pytest.raises(OutputLockedError, match=r"held by pid 7 on pod-a since 2026-12-01T00:00:00Z"):
        publish_files(where, {"a": b"1"})
    monkeypatch.setenv("SYNTHEHR_LOCK_STALE_S", "0.5")
    time.sleep(0.6)
    publish_files(where, {"a": b"1"})
    assert ls(where) == ["_SUCCESS", "a"] and not storage.exists(lock)


def test_heartbeat_refreshes_the_lock_while_held(where, monkeypatch):
    monkeypatch.setattr(publish, "HEARTBEAT_S", 0.05)
    lock = storage.lock_path(where)
    with storage.atomic_dir(where) as tmp:
        first = storage.read_json(lock)
        time.sleep(0.5)
        later = storage.read_json(lock)
        (tmp / "a").write_bytes(b"1")
    assert later["heartbeat"] > first["heartbeat"] and later["token"] == first["token"]
    assert later["pid"] == os.getpid() and not storage.exists(lock)


def test_a_lock_that_is_not_json_is_taken_over(where):
    storage.write_bytes(storage.lock_path(where), b"garbage")
    publish_files(where, {"a": b"1"})
    assert ls(where) == ["_SUCCESS", "a"]


def test_corrupt_success_marker_is_named(where):
    publish_files(where, {"a": b"1"})
    storage.write_bytes(storage.join(where, "_SUCCESS"), b"not json")
    with pytest.raises(IncompleteOutputError, match=rf"^{where}/_SUCCESS: not a synthehr completion marker"):
        storage.require_complete(where, "test")


# ------------------------------------------------------------------------------------------ full / unwritable disks
@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:120]}); disk-full cases need root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_during_a_stage_is_one_line_and_leaves_nothing(tiny_disk):
    (tiny_disk / "keep.txt").write_bytes(b"the user's")
    out = tiny_disk / "out"
    with pytest.raises(StorageError, match=rf"^{out}: no space left on the device while writing the output: free "
                                           r"space or choose another output location \(nothing was published"):
        with storage.atomic_dir(out) as tmp:
            storage.write_bytes(storage.join(tmp, "small.parquet"), b"x" * 1000)
            storage.write_bytes(storage.join(tmp, "big.parquet"), os.urandom(400_000))
    assert sorted(os.listdir(tiny_disk)) == ["keep.txt"]


def test_disk_full_in_stage_code_writing_directly(tiny_disk):
    out = tiny_disk / "out"
    with pytest.raises(StorageError, match=rf"^{out}: no space left on the device"):
        with storage.atomic_dir(out) as tmp:
            (tmp / "big.bin").write_bytes(os.urandom(400_000))                 # a raw OSError from the stage
    assert os.listdir(tiny_disk) == []


def test_disk_full_on_a_single_file_names_it(tiny_disk):
    path = tiny_disk / "sub" / "big.parquet"
    with pytest.raises(StorageError, match=rf"^{path}: no space left on the device while writing 400000 bytes"):
        storage.write_bytes(path, os.urandom(400_000))
    assert os.listdir(tiny_disk / "sub") == []


def test_read_only_location_is_refused_before_work(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:120]})")
    try:
        with pytest.raises(StorageError, match=rf"^{mnt / 'out'}: {mnt} is not writable by this user"):
            storage.check_output(mnt / "out")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(StorageError, match=rf"^{tmp_path / 'out'}: is a file, not a directory"):
        storage.check_output(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out").read_text() == "a file"


# ------------------------------------------------------------------------------------------ object-store errors
@pytest.mark.parametrize("base", ["gs", "s3"])
def test_missing_bucket_for_an_output_is_one_line(request, base):
    request.getfixturevalue({"gs": "gcs", "s3": "s3"}[base])
    uri = f"{base}://missing-bucket-15a/run/out"
    with pytest.raises(SynthEHRError, match=rf"^{uri}: bucket 'missing-bucket-15a' does not exist") as e:
        publish_files(uri, {"a": b"1"})
    assert "\n" not in str(e.value)


def test_s3_endpoint_down_is_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageError, match=r"^s3://b/k.json: cannot reach the S3 endpoint http://127.0.0.1:9"):
        storage.read_bytes("s3://b/k.json")


# ------------------------------------------------------------------------------------------ through a real stage
E2E = r'''
import os, signal, sys
from synthehr_core.storage import backends
cls = type(backends.backend(sys.argv[1]))
up = cls.upload_file
def upload_file(self, local, path):
    if path.endswith("/codes.parquet"):
        os.kill(os.getpid(), signal.SIGKILL)
    return up(self, local, path)
cls.upload_file = upload_file
from synthehr_core.cli import main
sys.argv = ["synthehr", "preprocess", "--config", "mimic3", "--out", sys.argv[1]]
main()
'''


def test_preprocess_killed_mid_upload_then_rules_refuse_and_a_rerun_replaces(gcs):
    out = f"{gcs}/{uuid.uuid4().hex[:8]}/tables"
    synthehr = [sys.executable, "-c", "from synthehr_core.cli import main; main()"]
    r = subprocess.run([sys.executable, "-c", E2E, out], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "_IN_PROGRESS" in ls(out) and "vocab.json" not in ls(out)
    r = subprocess.run([*synthehr, "rules", "--tables", out, "--out", f"{out}-rules"], capture_output=True,
                       text=True, timeout=120)
    said = " ".join((r.stderr + r.stdout).split())          # the CLI may wrap long lines
    assert r.returncode != 0 and f"{out}: incomplete output, written by a run that did not finish" in said
    assert "rerun the preprocess (or train / sample) stage" in said
    assert not storage.exists(f"{out}-rules")
    r = subprocess.run([*synthehr, "preprocess", "--config", "mimic3", "--out", out], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["n_patients"] == 100
    assert "_IN_PROGRESS" not in ls(out) and {"vocab.json", "codes.parquet", "_SUCCESS"} <= set(ls(out))
    storage.require_complete(out, "preprocess")


def test_a_run_that_lost_its_lock_publishes_nothing(where, monkeypatch):
    monkeypatch.setattr(publish, "HEARTBEAT_S", 0.05)
    lock = storage.lock_path(where)
    other = {"pid": 9, "host": "pod-b", "since": "2026-12-01T00:00:00Z", "heartbeat": time.time() + 3600,
             "token": "theirs"}
    with pytest.raises(OutputLockedError, match=rf"^{where}: this run lost its lock {lock} while it ran .*now held "
                                                r"by pid 9 on pod-b since 2026-12-01T00:00:00Z\): nothing was "
                                                r"published"):
        with storage.atomic_dir(where) as tmp:
            (tmp / "a").write_bytes(b"1")
            storage.write_json(lock, other)            # taken over as stale by another host's run
            time.sleep(0.3)                            # our heartbeat sees it and leaves it alone
    assert not storage.exists(where) and storage.read_json(lock) == other


def test_local_preprocess_killed_before_publishing_then_a_rerun_cleans_up(tmp_path):
    out = tmp_path / "tables"
    kill = ("import os, signal, sys\nfrom synthehr_core.storage import publish\n"
            "publish.write_manifest = lambda d: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from synthehr_core.cli import main\nmain()")
    args = ["preprocess", "--config", "mimic3", "--out", str(out)]
    r = subprocess.run([sys.executable, "-c", kill, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = sorted(os.listdir(tmp_path))
    assert left[0] == ".tables.lock" and left[1].startswith(".tables.tmp-") and len(left) == 2
    assert "patients.parquet" in os.listdir(tmp_path / left[1])            # the staged files, never published
    r = subprocess.run([sys.executable, "-c", "from synthehr_core.cli import main; main()", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["tables"]                       # stale temp and lock are gone
    assert "removed" in r.stderr and "died before publishing" in r.stderr and "removing the stale lock" in r.stderr
    storage.require_complete(out, "preprocess")


def test_output_lock_covers_writes_beside_the_final_publish(where):
    """A stage that writes checkpoints before it publishes holds the lock the whole time; its own atomic_dir
    reuses it and another process is refused throughout."""
    with storage.output_lock(where):
        storage.check_output(where)                                      # our own lock is not "another run"
        proc = child(where, "none")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and f"{where}: another synthehr run is writing here" in err
        with storage.atomic_dir(where) as tmp:
            (tmp / "model.pt").write_bytes(b"w")
        assert storage.exists(storage.lock_path(where))                  # still held by the outer block
    assert ls(where) == ["_SUCCESS", "model.pt"] and not storage.exists(storage.lock_path(where))


def test_lock_without_hard_links_uses_an_exclusive_create(tmp_path, monkeypatch):
    def no_link(a, b):
        raise OSError(1, "Operation not permitted")                  # what FUSE mounts of buckets answer
    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out"
    with storage.atomic_dir(out) as tmp:
        assert backend(str(out)).create_if_absent(storage.lock_path(out), b"x") is False
        (tmp / "a").write_bytes(b"1")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_lock_temp_left_by_a_dead_run_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".out.lock.new-{dead}-0badc0de").write_text("{}")
    publish_files(tmp_path / "out", {"a": b"1"})
    assert sorted(os.listdir(tmp_path)) == ["out"]
