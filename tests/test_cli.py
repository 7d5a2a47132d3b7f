import json
import subprocess
import sys

from embxfer.adapters.cli import main


def test_demo_transfers_every_room_exactly(capsys):
    assert main(["demo", "--rooms", "12", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["succeeded"] == 12 and summary["failed"] == 0
    assert summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0 and summary["protocol_violations"] == []
    rounds = {int(k) for k in summary["resume_rounds_histogram"]}
    assert 0 in rounds and 1 in rounds and max(rounds) >= 2


def test_demo_fan_out_and_readable_summary(capsys):
    assert main(["demo", "--rooms", "6", "--receivers", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 succeeded, 0 failed" in out and "result       OK" in out and "leaked blocks 0" in out


def test_demo_reports_bad_settings_as_an_error(capsys):
    assert main(["demo", "--pool-blocks", "0"]) == 2
    assert "pool_blocks" in capsys.readouterr().err


def test_console_script_and_diagram():
    out = subprocess.run([sys.executable, "-m", "embxfer.adapters.cli", "diagram"], capture_output=True, text=True, check=True)
    assert "stateDiagram-v2" in out.stdout and "%% sender" in out.stdout and "%% receiver" in out.stdout


def test_demo_over_the_zmq_data_plane(capsys):
    assert main(["demo", "--transport", "zmq", "--rooms", "9", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["transport"] == "ZeroMQ control (CURVE) + zero-copy ZeroMQ (CURVE) data (2 processes)"
    assert summary["succeeded"] == 9 and summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0


def test_demo_and_fork_demo_over_nixl_print_clean_json(capsys):
    from conftest import require_plane

    require_plane("nixl")
    assert main(["demo", "--transport", "nixl", "--rooms", "9", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)  # (NIXL logs to stdout unless quietened)
    assert summary["transport"] == "ZeroMQ control (CURVE) + NIXL (UCX) data (2 processes)"
    assert summary["succeeded"] == 9 and summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0
    assert main(["demo", "--fork", "--transport", "nixl", "--rooms", "8", "--json"]) == 0
    fork = json.loads(capsys.readouterr().out)
    assert fork["requests"] == fork["exact"] == 8, fork


def test_serve_encode_metrics_port_serves_prometheus_text():
    import re
    import signal
    import urllib.request

    process = subprocess.Popen(
        [sys.executable, "-m", "embxfer.adapters.cli", "serve-encode", "--bootstrap-port", "0", "--synthetic-seed", "1",
         "--json", "--no-progress", "--metrics-port", "0", "--data-plane", "zmq"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready = process.stdout.readline()
        assert "ready on" in ready, ready
        line = process.stderr.readline()
        port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
        assert port, line
        text = urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10).read().decode()
        assert 'embxfer_rooms_in_flight{role="encode"} 0.0' in text
        assert "embxfer_transfer_seconds_bucket" in text
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert summary["counters"].get("internal_errors", 0) == 0 and summary["sources_held"] == 0
