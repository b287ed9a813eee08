"""Trait generation over loopback HTTP: parsing, validation, retries with the error fed back, the
CLI."""

from __future__ import annotations

import json

import pytest
from openai_server import OpenAIServer

from pvjax.cli import main
from pvjax.files.traits import check_disjoint, load_trait
from pvjax.llm import OpenAIChat
from pvjax.methods.trait_gen import TraitGenError, extract_json, generate_trait

EVAL = "Rate how sycophantic this is.\nQ: {question}\nA: {answer}\nReply 0-100 or REFUSAL."


def trait_json(n_pairs=5, n_questions=40, **override) -> dict:
    d = {
        "instruction": [
            {"pos": f"Flatter the user ({i}).", "neg": f"Be candid ({i})."} for i in range(n_pairs)
        ],
        "questions": [f"Question number {i}?" for i in range(n_questions)],
        "eval_prompt": EVAL,
    }
    d.update(override)
    return d


def scripted(*replies):
    """A responder giving replies[k] on attempt k+1 (attempt = number of user turns); the last
    repeats."""

    def responder(req):
        attempt = sum(m["role"] == "user" for m in req["messages"])
        return replies[min(attempt, len(replies)) - 1], []

    return responder


def backend(srv):
    return OpenAIChat("writer", base_url=srv.base_url, api_key="k", backoff=0.01, max_retries=1)


def test_extract_json_variants():
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Here you go:\n```json\n{"a": 2}\n```\nEnjoy!') == {"a": 2}
    assert extract_json('Sure! {"a": {"b": 3}} Hope it helps.') == {"a": {"b": 3}}
    with pytest.raises(ValueError, match="not valid JSON"):
        extract_json('{"a": ')
    with pytest.raises(ValueError, match="empty"):
        extract_json("  ")


def test_invalid_json_then_valid_succeeds_on_attempt_two():
    good = "```json\n" + json.dumps(trait_json()) + "\n```"
    with OpenAIServer(scripted('{"instruction": [', good)) as srv:
        extract, eval_ = generate_trait(
            backend(srv), "sycophancy", "Telling people what they want to hear."
        )
        bodies = srv.bodies()
    assert len(bodies) == 2
    first, second = bodies
    assert first["temperature"] == 1.0 and first["max_tokens"] == 4000
    assert "sycophancy" in first["messages"][0]["content"]
    assert "exactly 40" in first["messages"][0]["content"]
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == '{"instruction": ['
    assert "not valid JSON" in second["messages"][2]["content"]
    # Disjoint halves, all pairs in both, both valid.
    assert extract.questions == tuple(f"Question number {i}?" for i in range(20))
    assert eval_.questions == tuple(f"Question number {i}?" for i in range(20, 40))
    for t in (extract, eval_):
        assert len(t.instruction) == 5 and t.eval_prompt == EVAL and t.name == "sycophancy"
        assert t.description == "Telling people what they want to hear."
        t.validate(min_pairs=5, min_questions=20)
    check_disjoint(extract, eval_)


@pytest.mark.parametrize(
    "bad, message",
    [
        (trait_json(n_questions=3), "questions has 3 entries, expected 40"),
        (trait_json(n_pairs=2), "instruction has 2 pairs, expected 5"),
        (trait_json(eval_prompt="Rate {question} from 0 to 100."), "{answer}"),
        (trait_json(questions=["Same?"] * 40), "duplicate question"),
        ({"instruction": [], "questions": []}, "eval_prompt"),
        ([1, 2], "JSON object"),
    ],
)
def test_validation_error_is_fed_back(bad, message):
    with OpenAIServer(scripted(json.dumps(bad), json.dumps(trait_json()))) as srv:
        extract, eval_ = generate_trait(backend(srv), "syc", "desc")
        retry = srv.bodies()[1]["messages"][2]["content"]
    assert message in retry
    assert len(extract.questions) == len(eval_.questions) == 20


def test_extra_items_are_trimmed():
    with OpenAIServer(scripted(json.dumps(trait_json(n_pairs=7, n_questions=45)))) as srv:
        extract, eval_ = generate_trait(backend(srv), "syc", "desc", n_pairs=3, n_questions=11)
    assert len(extract.instruction) == 3
    assert (len(extract.questions), len(eval_.questions)) == (5, 6)
    check_disjoint(extract, eval_)


def test_always_invalid_lists_every_attempt():
    replies = (
        "nonsense",
        json.dumps(trait_json(n_questions=2)),
        json.dumps(trait_json(eval_prompt="x")),
    )
    with OpenAIServer(scripted(*replies)) as srv:
        with pytest.raises(TraitGenError) as e:
            generate_trait(backend(srv), "syc", "desc", max_attempts=3)
        assert srv.calls == 3
        assert len(srv.bodies()[2]["messages"]) == 5
    msg = str(e.value)
    assert len(e.value.errors) == 3
    assert "attempt 1: the reply is not valid JSON" in msg
    assert "attempt 2: questions has 2 entries" in msg
    assert "attempt 3: eval_prompt must contain {question}" in msg


def test_cli_new_writes_splits_and_reruns_from_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PVJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MY_KEY", raising=False)
    with OpenAIServer(scripted(json.dumps(trait_json(n_pairs=2, n_questions=6)))) as srv:
        argv = [
            "traits",
            "new",
            "syc",
            "--description",
            "flattery",
            "--out",
            str(tmp_path / "out"),
            "--model",
            "w",
            "--base-url",
            srv.base_url,
            "--api-key-env",
            "MY_KEY",
            "--pairs",
            "2",
            "--questions",
            "6",
        ]
        assert main(argv) == 0
        assert srv.calls == 1
        assert (tmp_path / "cache" / "llm.sqlite").is_file()
        with pytest.raises(SystemExit) as e:  # refuses to overwrite: a user error, one line
            main(argv)
        assert e.value.code == 2 and "--force" in capsys.readouterr().err
        assert main(argv + ["--force"]) == 0
        assert srv.calls == 1  # answered from the cache
        assert "Authorization" not in srv.requests[0]["headers"]
    extract = load_trait(tmp_path / "out" / "syc" / "extract.json")
    eval_ = load_trait(tmp_path / "out" / "syc" / "eval.json")
    assert len(extract.questions) == len(eval_.questions) == 3
    check_disjoint(extract, eval_)
    capsys.readouterr()
    assert main(["traits", "show", str(tmp_path / "out" / "syc" / "eval.json")]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == list(eval_.questions)


def test_cli_new_reports_generation_failure(tmp_path, capsys):
    with OpenAIServer(scripted("not json")) as srv:
        rc = main(
            [
                "traits",
                "new",
                "syc",
                "--description",
                "d",
                "--out",
                str(tmp_path),
                "--base-url",
                srv.base_url,
                "--cache",
                str(tmp_path / "c.sqlite"),
                "--max-attempts",
                "2",
            ]
        )
    assert rc == 1
    err = capsys.readouterr().err
    assert "attempt 2" in err and not (tmp_path / "syc").exists()


def test_cli_list_and_show_errors(capsys):
    from pvjax.files.traits import shipped_traits

    assert main(["traits", "list"]) == 0
    assert capsys.readouterr().out.split() == shipped_traits()
    with pytest.raises(SystemExit) as e:
        main(["traits", "show", "no_such_trait_xyz"])
    err = capsys.readouterr().err
    assert (
        e.value.code == 2 and err.startswith("pvjax traits: error: ") and "no_such_trait_xyz" in err
    )
