"""The exhaustive checker, at a CI bound: the real core holds every invariant in every
interleaving; and the checker can fail — it finds a broken receiver with a shortest trace."""


from embxfer.adapters.cli import main
from embxfer.specs.checker import Config, explore


def test_bounded_exploration_with_faults_finds_no_violation(capsys):
    assert main(["check", "--lengths", "5", "--drops", "1", "--duplicates", "1", "--aborts", "1"]) == 0
    out = capsys.readouterr().out
    assert "no violation" in out
    states = int(out.split("states explored ")[1].split(",")[0])
    assert states > 1000


def test_two_receivers_with_a_crash():
    result = explore(Config(lengths=(2,), receivers=2, drops=0, duplicates=0, aborts=1, crashes=1))
    assert result.violation is None, (result.violation, result.trace)
    assert result.states > 100


def test_checker_finds_a_receiver_that_frees_aborted_blocks_at_once(receiver_without_quarantine):
    result = explore(Config(lengths=(3,), drops=0, duplicates=0, aborts=1))
    assert result.violation and "write of room 0" in result.violation[0]
    assert ("abort", 0, 0) in result.trace and len(result.trace) <= 6
