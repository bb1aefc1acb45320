"""Which Ray cluster finch joins: a stale `ray start` record must not make it wait for a dead one."""

from __future__ import annotations

import logging
import socket

from finch.runtime import cluster_address
from tests.conftest import free_port


def record_ray_start(monkeypatch, tmp_path, address: str) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where Ray keeps `ray start`'s record
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(address)


def test_a_dead_recorded_cluster_means_a_local_one_with_a_warning(monkeypatch, tmp_path, caplog):
    port = free_port()  # nothing listens there
    record_ray_start(monkeypatch, tmp_path, f"127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="finch"):
        assert cluster_address() == "local"
    assert f"127.0.0.1:{port}" in caplog.text and "does not answer" in caplog.text


def test_a_live_recorded_cluster_is_joined(monkeypatch, tmp_path):
    with socket.socket() as gcs:
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        address = f"127.0.0.1:{gcs.getsockname()[1]}"
        record_ray_start(monkeypatch, tmp_path, address)
        assert cluster_address() == address


def test_ray_address_wins_and_no_record_means_local(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address() == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address() == "10.0.0.5:6379"
