"""cluster.local start/stop on a machine where another Ray runs: free ports, and stop ends only its own head."""

from __future__ import annotations

import pytest

from cluster import local


@pytest.mark.slow
def test_start_and_stop_leave_an_unrelated_ray_untouched(tmp_path, capsys):
    other = local.LocalHead(num_cpus=1, dashboard_port=local.free_port(), gcs_port=local.free_port(), auth=False,
                            token_file=tmp_path / "other-token")
    with other as other_address:
        assert local.main(["start", "--num-cpus", "1", "--no-auth", "--state-dir", str(tmp_path / "state")]) == 0
        record = local.read_head(tmp_path / "state")
        assert record["address"] != other_address and local._answers(record["address"])
        assert local.main(["start", "--num-cpus", "1", "--no-auth", "--state-dir", str(tmp_path / "state")]) == 1
        assert "already running" in capsys.readouterr().err  # one head per state folder
        assert local.main(["stop", "--state-dir", str(tmp_path / "state")]) == 0
        assert f"stopped the head at {record['address']}" in capsys.readouterr().out
        assert not local._alive(record["pgid"]) and not local._answers(record["address"])
        assert local._answers(other_address)  # the unrelated head still answers
        assert local.main(["stop", "--state-dir", str(tmp_path / "state")]) == 0
        assert "nothing stopped" in capsys.readouterr().out


def test_stop_without_a_recorded_head_touches_nothing(tmp_path):
    assert "nothing stopped" in local.stop_head(tmp_path)


def test_a_head_made_without_ports_takes_free_ones(tmp_path):
    """No fixed default: the job server's and GCS's ports are found free when the head is made (not started here)."""
    head = local.LocalHead(auth=False, token_file=tmp_path / "token")
    dashboard = int(head.address.rsplit(":", 1)[1])
    assert local.port_is_free(dashboard) and local.port_is_free(head.gcs_port)
    assert f"--port={head.gcs_port}" in head.command and f"--dashboard-port={dashboard}" in head.command
