"""Shared fixtures: real services (PostgreSQL, Mosquitto) and scratch directories.

Under CI=true a test that needs a service (or a program such as promtool) fails when it
is missing; locally it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Fail under CI, skip locally, when a service is down."""
    if _reachable(host, port):
        return
    _missing(f"{name} is not reachable on {host}:{port}")


def _missing(message: str) -> NoReturn:
    """A service or program a test needs is missing: fail under CI, skip locally."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: it is required)")
    pytest.skip(message)


@pytest.fixture
def require_binary() -> Callable[[str, str], str]:
    """`require_binary(name, package)`: the program's path; fails under CI, skips locally.

    `make test` installs the Debian packages these programs come from (its `sysdeps`).
    """

    def find(name: str, package: str) -> str:
        path = shutil.which(name)
        if path is not None:
            return path
        _missing(f"{name} not installed (Debian package {package}; `make test` installs it)")

    return find


@pytest.fixture
def in_threads() -> Callable[..., list[BaseException]]:
    """`in_threads(*works, rounds=15)`: each `work(round_)` for every round, each work in
    its own thread, all at once; returns what they raised (writers racing on one store).
    """

    def run(*works: Callable[[int], object], rounds: int = 15) -> list[BaseException]:
        errors: list[BaseException] = []

        def loop(work: Callable[[int], object]) -> None:
            try:
                for round_ in range(rounds):
                    work(round_)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(w,)) for w in works]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return errors

    return run


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards.

    Yields a SQLAlchemy URL (`postgresql+psycopg://...`).
    """
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg

    name = f"ew_{uuid.uuid4().hex[:12]}"
    admin = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def mqtt_broker() -> tuple[str, int]:
    """The real Mosquitto broker's address."""
    require_service("Mosquitto", MQTT_HOST, MQTT_PORT)
    return MQTT_HOST, MQTT_PORT
