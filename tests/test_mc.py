"""Multiple-choice scoring: letter logprobs against transformers (unsteered, steered and ablated
rows of one batch), and malformed files refused with the file and line named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import save_tiny

import pvjax
from pvjax import interventions as ivs
from pvjax.measure import mc
from pvjax.studies import grid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A tiny random Llama with the embedded model's tokenizer, and its transformers twin."""
    folder = tmp_path_factory.mktemp("tiny_mc")
    hf = save_tiny("llama_gqa_untied", folder, tokenizer=tokenizer)
    return pvjax.load(folder), hf


def hf_letter_logprobs(hf, tokenizer, text, letters, hook=None, layer=None):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    handle = hf.model.layers[layer - 1].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0, -1]
    finally:
        if handle:
            handle.remove()
    return torch.log_softmax(logits.double(), -1)[letters].numpy()


def test_letter_logprobs_match_transformers_per_row(tiny, tokenizer):
    model, hf = tiny
    items = mc.read_items("general", limit=5)
    L, D = model.n_layers + 1, model.hidden_size
    rng = np.random.default_rng(0)
    v = rng.standard_normal(D).astype(np.float32)
    u = rng.standard_normal(D).astype(np.float32)
    u_unit = u / np.linalg.norm(u)
    iv = grid.stack(
        [ivs.build(L, D), ivs.build(L, D, steer=[(v, 2, 3.0)]), ivs.build(L, D, ablate=[(u, 1)])]
    )
    ours = mc.score(
        model, items, intervention=iv, positions="all", batch_size=4
    )  # rows mix settings
    assert ours.shape == (3, 5, 4)
    # The letter ids, found independently of pvjax: the byte-level BPE token for " A".
    letters = [tokenizer.convert_tokens_to_ids("Ġ" + x) for x in "ABCD"]
    assert list(mc.letter_ids(model)) == letters

    def steer(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + 3.0 * torch.tensor(v)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    def ablate(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        uu = torch.tensor(u_unit)
        h = h - (h @ uu)[..., None] * uu
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    for n, item in enumerate(items):
        text = mc.prompt_text(model, item)
        assert text.endswith("Answer:") and f"D. {item.choices[3]}" in text
        for s, (hook, layer) in enumerate([(None, None), (steer, 2), (ablate, 1)]):
            ref = hf_letter_logprobs(hf, tokenizer, text, letters, hook, layer)
            np.testing.assert_allclose(ours[s, n], ref, atol=2e-4, rtol=0)
    # The steered row differs from the unsteered one, so the comparison above has teeth.
    assert np.abs(ours[1] - ours[0]).max() > 1e-2


def test_accuracy_and_p_correct_arithmetic():
    items = [mc.Item("q", ("a", "b", "c", "d"), k) for k in (0, 1, 2)]
    lp = np.log(np.array([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.6, 0.1], [0.25, 0.25, 0.4, 0.1]]]))
    assert mc.accuracy(lp, items).tolist() == pytest.approx([2 / 3])
    assert mc.p_correct(lp, items).tolist() == pytest.approx([(0.7 + 0.2 + 0.4) / 3])


def test_shipped_set_reads_and_is_balanced():
    items = mc.read_items("general")
    assert len(items) >= 30
    counts = np.bincount([it.answer for it in items], minlength=4)
    assert counts.min() >= len(items) // 4 - 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("What is 2+2?,3,4,5\n", "line 2: expected 6 columns"),
        ("What is 2+2?,3,4,5,6,E\n", "line 2: the answer must be one of A, B, C, D, got 'E'"),
        (",3,4,5,6,B\n", "line 2: the question is empty"),
        ("What is 2+2?,3,,5,6,B\n", "line 2: choice B is empty"),
    ],
)
def test_a_malformed_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.csv"
    path.write_text("Which is red?,Sky,Grass,Blood,Snow,C\n" + line)
    with pytest.raises(mc.MCError, match=f"bad.csv {message}"):
        mc.read_items(path)


def test_header_and_missing_file(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("question,A,B,C,D,answer\nWhich is red?,Sky,Grass,Blood,Snow,c\n")
    assert [it.answer for it in mc.read_items(path)] == [2]
    with pytest.raises(mc.MCError, match="does not exist"):
        mc.read_items(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(mc.MCError, match="no items"):
        mc.read_items(tmp_path / "empty.csv")
