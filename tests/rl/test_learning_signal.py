"""The warning for a GRPO start that cannot learn: all responses unparsable on the first step."""
from megavrl.rl import learning_signal
from megavrl.rl.learning_signal import LearningSignalCheck, no_learning_signal_message


def test_message_only_when_every_response_failed_to_parse():
    assert no_learning_signal_message({"reward/parse_fail_rate": 0.75}, "m") is None
    assert no_learning_signal_message({}, "m") is None
    text = no_learning_signal_message({"reward/parse_fail_rate": 1.0}, "runs/x/tiny-hf")
    assert "runs/x/tiny-hf" in text and "algorithm.name=sft" in text


def test_warns_once_on_the_first_step_only(monkeypatch):
    warned = []
    monkeypatch.setattr(learning_signal.log, "warning", lambda fmt, *args: warned.append(fmt % args))
    check = LearningSignalCheck("tiny-hf")
    check.check(1, {"reward/parse_fail_rate": 1.0})
    check.check(2, {"reward/parse_fail_rate": 1.0})
    assert len(warned) == 1 and warned[0].startswith("step 1:")
    later = LearningSignalCheck("sft-hf")
    later.check(5, {"reward/parse_fail_rate": 0.5})  # the first step of this run had answers
    later.check(6, {"reward/parse_fail_rate": 1.0})
    assert len(warned) == 1
