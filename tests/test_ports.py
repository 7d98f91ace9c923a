"""The port picker for the servers tests start (tests/ports.py)."""

from __future__ import annotations

import ports
import pytest


def test_free_ports_are_distinct_even_when_the_range_leaves_no_room_to_repeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two draws from three ports repeat one in a third of the tries; a service given the same
    # port for PORT and METRICS_PORT refuses to start (CI, test_metrics, k8s-async-2-workers).
    monkeypatch.setattr(
        ports, "SERVER_PORTS", range(ports.SERVER_PORTS.start, ports.SERVER_PORTS.start + 3)
    )
    for _ in range(50):
        picked = ports.free_ports(2)
        assert len(set(picked)) == 2
        assert all(port in ports.SERVER_PORTS for port in picked)


def test_free_ports_names_the_range_when_it_cannot_find_enough(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        ports, "SERVER_PORTS", range(ports.SERVER_PORTS.start, ports.SERVER_PORTS.start + 1)
    )
    with pytest.raises(RuntimeError, match=r"no 2 free ports on 127\.0\.0\.1 in 20000-20000"):
        ports.free_ports(2)
