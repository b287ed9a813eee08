"""Trait files: the shipped data is well formed, the format round-trips, and bad files say what is
wrong."""

from __future__ import annotations

import json

import pytest

from pvjax.files.traits import Pair, Trait, TraitError, check_disjoint, load_trait, shipped_traits

EXPECTED = [
    "apathetic",
    "evil",
    "hallucinating",
    "humorous",
    "impolite",
    "optimistic",
    "sycophantic",
]

RUBRIC = (
    "Judge this.\n[QUESTION START]\n{question}\n[QUESTION END]\n"
    "[ANSWER START]\n{answer}\n[ANSWER END]\nRespond with a number between 0 and 100."
)


def _valid_dict() -> dict:
    return {
        "instruction": [
            {"pos": "Be evil.", "neg": "Be kind."},
            {"pos": "Be cruel.", "neg": "Be gentle."},
        ],
        "questions": ["What is life?", "How do I help?"],
        "eval_prompt": RUBRIC,
    }


def _write(tmp_path, obj, name="mytrait.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def test_shipped_trait_names():
    assert shipped_traits() == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_shipped_trait_splits_are_complete_and_disjoint(name):
    ext = load_trait(name, "extract").validate(min_pairs=5, min_questions=20)
    ev = load_trait(name, "eval").validate(min_pairs=5, min_questions=20)
    for t in (ext, ev):
        assert t.name == name
        assert len(t.instruction) == 5 and len(t.questions) == 20
        assert t.description
        assert "REFUSAL" in t.eval_prompt and "just the number" in t.eval_prompt
    check_disjoint(ext, ev)
    assert load_trait(name) == ext  # extract is the default split


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("split", ["extract", "eval"])
def test_round_trip_is_byte_stable(name, split, tmp_path):
    t = load_trait(name, split)
    assert Trait.from_dict(t.to_dict(), name) == t
    first = t.save(tmp_path / f"{name}.json")
    again = load_trait(first)
    assert again == t
    second = again.save(tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temp file left behind


def test_reference_repository_format_loads_by_path(tmp_path):
    d = _valid_dict()
    d["source_notes"] = "extra keys written by other tools are ignored"
    path = _write(tmp_path, d, "evil.json")
    t = load_trait(str(path))
    assert t.name == "evil"
    assert t.instruction == (Pair("Be evil.", "Be kind."), Pair("Be cruel.", "Be gentle."))
    assert t.questions == ("What is life?", "How do I help?")
    assert t.description == ""
    assert "description" not in t.to_dict() and "source_notes" not in t.to_dict()
    t.validate()


def _error(tmp_path, obj) -> str:
    with pytest.raises(TraitError) as exc:
        load_trait(_write(tmp_path, obj)).validate()
    return str(exc.value)


def test_invalid_json_names_file_and_position(tmp_path):
    msg = _error(tmp_path, '{"instruction": [}')
    assert "mytrait.json" in msg and "not valid JSON" in msg and "line 1" in msg


def test_missing_instruction(tmp_path):
    d = _valid_dict()
    del d["instruction"]
    msg = _error(tmp_path, d)
    assert "mytrait.json" in msg and "'instruction'" in msg


def test_pair_without_neg(tmp_path):
    d = _valid_dict()
    d["instruction"].append({"pos": "Be vile."})
    assert "mytrait.json: instruction[2] lacks 'neg'" in _error(tmp_path, d)


def test_questions_must_be_strings(tmp_path):
    d = _valid_dict()
    d["questions"] = ["fine", 3]
    assert "questions must be a list of strings" in _error(tmp_path, d)


def test_eval_prompt_without_answer_placeholder(tmp_path):
    d = _valid_dict()
    d["eval_prompt"] = "Rate {question} please."
    assert "mytrait.json: eval_prompt lacks the {answer} placeholder" in _error(tmp_path, d)


def test_duplicate_questions_compare_casefolded(tmp_path):
    d = _valid_dict()
    d["questions"].append("  what is LIFE?")
    msg = _error(tmp_path, d)
    assert msg.startswith("mytrait.json: questions: duplicate question") and "what is LIFE?" in msg


def test_empty_pair_and_minimum_counts():
    t = Trait.from_dict(_valid_dict(), "t")
    with pytest.raises(TraitError, match="need at least 5"):
        t.validate(min_pairs=5)
    with pytest.raises(TraitError, match="need at least 3"):
        t.validate(min_questions=3)
    d = _valid_dict()
    d["instruction"][0]["neg"] = "  "
    with pytest.raises(TraitError, match=r"instruction\[0\]\.neg is empty"):
        Trait.from_dict(d, "t").validate()


def test_unknown_trait_lists_shipped_names():
    with pytest.raises(TraitError) as exc:
        load_trait("grumpy")
    msg = str(exc.value)
    assert "'grumpy'" in msg and all(name in msg for name in EXPECTED)


def test_missing_path_and_bad_split(tmp_path):
    with pytest.raises(TraitError, match="not found.*evil"):
        load_trait(tmp_path / "nope.json")
    with pytest.raises(TraitError, match="split"):
        load_trait("evil", "train")


def test_check_disjoint_names_overlap():
    a = Trait.from_dict(_valid_dict(), "a")
    d = _valid_dict()
    d["questions"] = ["Something else?", "how do i help? "]
    with pytest.raises(TraitError, match="How do I help"):
        check_disjoint(a, Trait.from_dict(d, "b"))


def test_render_eval_leaves_other_braces_alone():
    d = _valid_dict()
    d["eval_prompt"] = 'Output like {"score": 50} or {x}.\nQ: {question}\nA: {answer}\n{question}'
    t = Trait.from_dict(d, "t").validate()
    out = t.render_eval("why {answer}?", "because {question}")
    assert out == (
        'Output like {"score": 50} or {x}.\nQ: why {answer}?\nA: because {question}\nwhy {answer}?'
    )


def test_shipped_rubrics_render():
    t = load_trait("sycophantic", "eval")
    out = t.render_eval("Q?", "A.")
    assert (
        "[QUESTION START]\nQ?\n[QUESTION END]" in out and "[ANSWER START]\nA.\n[ANSWER END]" in out
    )
    assert "{question}" not in out and "{answer}" not in out
