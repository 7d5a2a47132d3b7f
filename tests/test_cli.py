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
