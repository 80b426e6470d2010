"""The embedded store: one nx-27017 per directory, its log and pid beside its data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pymongo
import pytest

from stack.embedded import EmbeddedMongo, StoreLocked, free_port

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def wait_gone(pid: int) -> None:
    while alive(pid):  # bounded by the pytest run, not a wall clock
        time.sleep(0.05)


def test_a_second_start_uses_the_running_store(tmp_path: Path) -> None:
    first = EmbeddedMongo(tmp_path / "store")
    uri = first.start()
    try:
        pid = first.pid
        assert pid is not None
        assert (tmp_path / "store" / "nx-27017.pid").read_text().strip() == str(pid)
        assert (tmp_path / "store" / "nx-27017.log").exists()
        assert json.loads((tmp_path / "store" / "store.lock").read_text())["uri"] == uri
        second = EmbeddedMongo(tmp_path / "store")
        assert second.start() == uri and second.pid == pid  # the same server, not another on the same files
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        client["t"]["c"].insert_one({"x": 1})
        client.close()
        second.stop()  # not its store: left running
        assert alive(pid)
    finally:
        first.stop()
    wait_gone(pid)
    # the directory is free again: a new start runs a new server on the same data
    with EmbeddedMongo(tmp_path / "store") as again:
        client = pymongo.MongoClient(again, serverSelectionTimeoutMS=5000)
        assert client["t"]["c"].find_one({}, {"_id": 0}) == {"x": 1}
        client.close()


HOLDER = textwrap.dedent(
    """
    import fcntl, json, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "uri": sys.argv[2], "starter": os.getpid()}).encode())
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_locked_directory_whose_store_does_not_answer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    silent = f"mongodb://127.0.0.1:{free_port()}/"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "store" / "store.lock"), silent],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked) as caught:
            EmbeddedMongo(tmp_path / "store", start_timeout_s=1.0).start()
        message = str(caught.value)
        assert f"locked by process {holder.pid}" in message and "does not answer" in message
        assert sys.executable in message  # the holder's command line
    finally:
        holder.kill()
        holder.wait()


STARTER = textwrap.dedent(
    """
    import sys, time
    from stack.embedded import EmbeddedMongo
    store = EmbeddedMongo(sys.argv[1])
    print(store.start(), store.pid, flush=True)
    time.sleep(600)
    """
)


def test_a_store_whose_starter_died_is_adopted_and_stopped(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path / "store")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert starter.stdout is not None
    uri, pid_text = starter.stdout.readline().split()
    starter.send_signal(signal.SIGKILL)  # the store outlives it, holding the directory
    starter.wait()
    pid = int(pid_text)
    assert alive(pid)
    try:
        adopter = EmbeddedMongo(tmp_path / "store")
        assert adopter.start() == uri and adopter.pid == pid
        adopter.stop()
        wait_gone(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
