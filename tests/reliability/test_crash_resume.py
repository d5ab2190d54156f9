"""Short versions of the crash-resume campaign (`benchmarks/reliability.py`): `launch.train` on the
tiny model, killed and restarted with the same command, must end bit for bit where an uninterrupted
run ends (every step's loss and the final params), with no failed restart."""
import pytest

from benchmarks import reliability


def test_sigkill_inside_a_checkpoint_write_resumes_exactly(tmp_path):
    stats = reliability.campaign(tmp_path, ["kill_in_write"], steps=8, checkpoint_every=3)
    assert stats["sigkill_in_write"] == 1 and stats["sigkill"] == 1
    assert stats["runs_compared"] == 1 + stats["missed_interruptions"]


@pytest.mark.slow
def test_kills_preemptions_and_corruptions_resume_exactly(tmp_path):
    plan = ["kill_in_write", "kill_random", "sigterm", "kill_in_write", "sigterm", "kill_random"]
    stats = reliability.campaign(tmp_path, plan, corruptions=2, steps=20, checkpoint_every=3, seed=1)
    assert stats["sigkill"] + stats["sigterm_143"] >= 4
    assert stats["corruptions"] >= 1 and len(stats["fallbacks"]) == stats["corruptions"]


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    result = reliability.full_disk(tmp_path)
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["intact_checkpoints"]
