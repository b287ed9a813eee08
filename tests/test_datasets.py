"""One reader of chat JSONL and prompt/answer CSV (`pvjax.files.datasets.jsonl_lines` /
`csv_records`) serves screening (`read_dataset`) and training (`finetune.data.read_samples`): the
same file gives the same conversations to both, and both name a bad record's real line."""

from __future__ import annotations

import pytest

from pvjax.files.datasets import read_dataset
from pvjax.finetune.data import DataError, read_samples

CHAT = (
    '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": '
    '"Hi\\u2028there"},'
    ' {"role": "assistant", "content": "Yo."}]}\r\n\n'
    '{"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1, '
    '2"}]}\n'
)
PAIRS = 'prompt,answer\n"Two\nlines",ok\n\nCount.,"1,\r\n2"\n'


def test_screening_and_training_read_the_same_samples(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(CHAT.encode())
    (tmp_path / "d.csv").write_bytes(PAIRS.encode())
    for name in ("d.jsonl", "d.csv"):
        screened, trained = read_dataset(tmp_path / name), read_samples(tmp_path / name)
        assert len(screened.samples) == len(trained) == 2
        for s, msgs in zip(screened.samples, trained):
            assert msgs[-1] == {"role": "assistant", "content": s.answer}
            assert [m["content"] for m in msgs[:-1]] == [m["content"] for m in s.prompt]
        assert "".join(screened.chunks) == (tmp_path / name).read_bytes().decode()
    assert [s.line for s in read_dataset(tmp_path / "d.csv").samples] == [2, 5]
    assert read_samples(tmp_path / "d.jsonl")[0][1]["content"] == "Hi\u2028there"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.csv", 'question,answer\n"two\nlines",ok\n\nx,\n', "a.csv:5: empty answer"),
        (
            "b.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
            '"yo"}]}\n{oops\n',
            "b.jsonl:2: not valid JSON",
        ),
        ("c.jsonl", '\n{"prompt": "hi"}\n', 'c.jsonl:2: expected an object with a "messages" list'),
        ("d.csv", "", "holds no samples"),
    ],
)
def test_the_training_reader_names_the_line_of_a_bad_record(tmp_path, name, text, message):
    (tmp_path / name).write_bytes(text.encode())
    with pytest.raises(DataError, match=message):
        read_samples(tmp_path / name)
