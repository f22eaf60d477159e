"""The derived rules (mtf_train/rules.py) that several stages share, against hand-computed values."""
import pytest

from mtf_train import rules

pytestmark = pytest.mark.unit


def test_padded_vocab_rounds_to_a_multiple_of_divisible_by_times_tp():
    assert rules.padded_vocab(250680, 1, 128) == 250752
    assert rules.padded_vocab(250680, 4, 128) == 250880
    assert rules.padded_vocab(2531, 2, 128, pad_to=4096) == 4096  # pad_to wins (callers check it is large enough)


def test_shape_arithmetic():
    assert rules.data_parallel(128, 1, 2) == 64 and rules.data_parallel(6, 4, 1) is None
    assert rules.grad_accum(2048, 1, 64) == 32 and rules.grad_accum(100, 3, 2) is None
    assert rules.grad_accum(8, 1, None) is None
    assert rules.partition_units(70, "type:transformer|embedding") == 72
    assert rules.partition_units(70, "type:transformer") == rules.partition_units(70, "uniform") == 70


def test_batch_schedule_length_with_and_without_rampup():
    flat = rules.BatchSchedule(8)
    assert flat.length(None, 80) == (10, 80) and flat.length(10, None) == (10, 80)
    ramp = rules.BatchSchedule(8, (2, 2, 12))  # 2, 4, 6 then 8 after 4 samples per increment
    assert [ramp(c) for c in (0, 3, 4, 8, 12)] == [2, 2, 4, 6, 8]
    iters, samples = ramp.length(None, 30)
    assert ramp.samples(iters) == samples == 30 and ramp.length(iters, None) == (iters, ramp.samples(iters))


def test_eval_samples_per_group_counts_a_final_evaluation():
    assert rules.eval_samples_per_group(train_iters=1000, eval_interval=250, eval_iters=10, global_batch=8) == 400
    assert rules.eval_samples_per_group(999, 250, 10, 8) == 320
