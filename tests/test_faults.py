"""The short version of the fault-injection benchmark: every fault handled as documented."""

from bench import faults


def test_faults_are_survived_or_refused_as_documented(capsys):
    code = faults.main(["--kills", "3", "--steps", "12", "--seed", "1"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
    assert code == 0 and not [line for line in lines if line.startswith("FAIL")], out
    names = [line.split(":")[0][5:] for line in lines]
    assert names == [
        "SIGKILL 1/3 after a new best checkpoint",
        "SIGKILL 2/3 during a checkpoint write",
        "SIGKILL 3/3 at a random moment",
        "resume after 3 kills",
        "damaged latest checkpoint",
        "SIGTERM",
        "non-finite loss",
        "failed checkpoint write",
        "changed optimizer (grad_clip_norm=1.0)",
    ], out
    assert "all 12 losses bitwise equal" in out and "total: 9 of 9 faults" in out
