"""Packed rows give each sequence exactly the pooled activations it gets when run alone."""

import numpy as np
import pytest

import pvjax
from pvjax.measure.packing import choose_width, pack, plan_rows, pooled_activations


def test_plan_rows_respects_width_and_keeps_everything():
    lengths = [50, 200, 7, 130, 64, 64, 1, 250]
    rows = plan_rows(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert len(rows) == 4


def test_bad_prompt_lengths_are_named():
    with pytest.raises(ValueError, match="sequence 1: prompt length 9"):
        pack([[1, 2, 3], [4, 5]], [2, 9])
    with pytest.raises(ValueError, match="empty"):
        pack([], [])


def test_packed_pooling_equals_each_sequence_alone(smollm2):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 40000, n).tolist() for n in (30, 5, 61, 17, 44, 9)]
    prompt_lens = [12, 5, 20, 3, 44, 8]  # one row without response tokens, one with one
    packed = pooled_activations(smollm2, seqs, prompt_lens, width=64, rows_per_batch=2)
    assert packed.shape == (6, 31, 3, 576)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        h = np.asarray(pvjax.forward(smollm2, np.array([s])).hidden_states[:, 0], np.float64)
        want = np.stack(
            [
                h[:, p:].mean(1) if len(s) > p else np.zeros_like(h[:, 0]),
                h[:, :p].mean(1),
                h[:, p - 1],
            ],
            axis=1,
        )
        np.testing.assert_allclose(packed[i], want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_last_batch_holds_only_the_rows_left():
    seqs = [[5] * 60 for _ in range(11)]  # one sequence per 64-wide row: 11 rows
    batches = pack(seqs, [30] * 11, width=64, rows_per_batch=4)
    assert [b.tokens.shape[0] for b in batches] == [4, 4, 4]
    assert [len(b.members) for b in batches] == [4, 4, 3]
    batches = pack(seqs[:9], [30] * 9, width=64, rows_per_batch=4)
    assert [b.tokens.shape[0] for b in batches] == [4, 4, 1]
    batches = pack(seqs[:6], [30] * 6, width=64, rows_per_batch=8)
    assert [b.tokens.shape[0] for b in batches] == [8]


def test_chosen_width_wastes_less_than_a_fixed_one():
    # Three length groups (like prompts with short, medium and long answers) that fit 224 well.
    lengths = [75] * 11 + [110] * 11 + [144] * 10
    seqs = [[5] * n for n in lengths]
    w = choose_width(lengths, rows_per_batch=4)
    assert w >= 144 and w % 32 == 0
    slots = lambda bs: sum(b.tokens.size for b in bs)
    auto = pack(seqs, [10] * len(seqs), rows_per_batch=4)
    fixed = pack(seqs, [10] * len(seqs), width=256, rows_per_batch=4)
    assert auto[0].tokens.shape[1] == w
    assert slots(auto) < slots(fixed)
    assert sorted(i for b in auto for i, _, _ in b.members) == list(range(len(seqs)))
