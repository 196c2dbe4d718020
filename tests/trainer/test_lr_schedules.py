"""Learning-rate schedules against their closed forms; ReduceLROnPlateau against a hand trace."""
import math

import pytest

from engine.training.schedules import (Constant, ReduceLROnPlateau, StepDecay, WarmupCosine,
                              make_schedule)


def test_constant_and_step_decay_follow_their_closed_forms():
    assert [Constant(0.1)(e) for e in range(5)] == [0.1] * 5
    step = StepDecay(0.1, step_epochs=3, factor=0.5)
    assert [step(e) for e in range(8)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025], rel=1e-15)


def test_warmup_cosine_follows_its_closed_form():
    peak, low, warmup, total = 0.1, 0.001, 3, 13
    schedule = WarmupCosine(peak, total_epochs=total, warmup_epochs=warmup, min_learning_rate=low)
    for epoch in range(total + 2):
        if epoch < warmup:
            expected = peak * (epoch + 1) / (warmup + 1)
        else:
            progress = min(1.0, (epoch - warmup) / (total - warmup))
            expected = low + (peak - low) * (1 + math.cos(math.pi * progress)) / 2
        assert schedule(epoch) == pytest.approx(expected, rel=1e-12), epoch
    rates = [schedule(e) for e in range(total)]
    assert rates[:warmup + 1] == sorted(rates[:warmup + 1]) and rates[warmup] == peak
    assert rates[warmup:] == sorted(rates[warmup:], reverse=True)
    assert schedule(total) == schedule(total + 5) == pytest.approx(low)


def test_plateau_reduces_after_patience_then_cools_down_and_stops_at_the_floor():
    schedule = ReduceLROnPlateau(1.0, monitor="val_loss", factor=0.5, patience=2, cooldown=1,
                                 min_delta=0.0, min_learning_rate=0.2)
    losses = [1.0, 0.9, 0.95, 0.92, 0.91, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
    # Worked by hand: best 0.9 at epoch 1; epochs 2, 3 without improvement -> 0.5 (cooldown 1);
    # epoch 4 in cooldown; 5, 6 -> 0.25; 7 cooldown; 8, 9 -> 0.2 (the floor); nothing after.
    expected = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2]
    rates = []
    for epoch, loss in enumerate(losses):
        schedule.update(epoch, {"val_loss": loss})
        rates.append(schedule(epoch + 1))
    assert rates == pytest.approx(expected)


def test_plateau_watches_accuracy_upwards_and_its_state_round_trips():
    schedule = ReduceLROnPlateau(1.0, monitor="val_accuracy", factor=0.1, patience=1)
    schedule.update(0, {"val_accuracy": 0.5})
    schedule.update(1, {"val_accuracy": 0.6})
    assert schedule(2) == 1.0
    copy = ReduceLROnPlateau(1.0, monitor="val_accuracy", factor=0.1, patience=1)
    copy.set_state(schedule.get_state())
    for s in (schedule, copy):
        s.update(2, {"val_accuracy": 0.55})
    assert schedule(3) == copy(3) == pytest.approx(0.1)


def test_make_schedule_builds_each_cli_name_and_refuses_others():
    assert isinstance(make_schedule("constant", 0.1, epochs=5), Constant)
    assert make_schedule("step", 0.1, epochs=5, step_epochs=2, factor=0.5)(2) == 0.05
    cosine = make_schedule("warmup-cosine", 0.1, epochs=10, warmup_epochs=2)
    assert cosine.total_epochs == 10 and cosine.warmup_epochs == 2
    assert make_schedule("plateau", 0.1, epochs=5, patience=3).patience == 3
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        make_schedule("cosine", 0.1, epochs=5)
    with pytest.raises(ValueError, match="warmup_epochs needs"):
        make_schedule("constant", 0.1, epochs=5, warmup_epochs=2)
    with pytest.raises(ValueError, match="warmup_epochs must be less than total_epochs"):
        WarmupCosine(0.1, total_epochs=3, warmup_epochs=3)
