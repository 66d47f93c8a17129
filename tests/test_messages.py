"""Messages a user meets first: undecodable or malformed data files, hub ids, the tokenizer's
length warning under ``truncate``, record numbers from 1."""

from __future__ import annotations

import json
import logging

import pytest

from influscope import Influence
from influscope.errors import DataError
from influscope.loading import load_model, load_records
from influscope.toy import tiny_gpt2


def test_a_file_that_is_not_utf8_names_the_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = json.dumps({"text": "fine"}).encode() + b"\n"
    path.write_bytes(first + '{"text": "café"}\n'.encode("latin-1"))
    offset = len(first) + len(b'{"text": "caf')
    with pytest.raises(
        DataError, match=rf"latin1.jsonl is not UTF-8: line 2, byte offset {offset} "
    ) as err:
        load_records(path)
    message = str(err.value)
    assert "b'\\xe9" in message and "iconv -f latin1 -t utf-8" in message
    assert "errors='replace'" in message
    assert load_records(path, errors="replace")[1] == {"text": "caf\ufffd"}  # what it suggests


def test_a_byte_order_mark_does_not_shift_the_offset(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(DataError, match=r"line 1, byte offset 5 \(column 6\)"):
        load_records(path)


def test_invalid_json_gives_the_line_column_and_the_text_there(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "b", [text]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3, column 15 is not valid JSON") as err:
        load_records(path)
    assert '{"text": "b", ⟨here⟩[text]}' in str(err.value)  # the whole excerpt, brackets kept
    whole = tmp_path / "bad.json"
    whole.write_text('[{"text": "a"},\n {"text": "b"\n]')
    with pytest.raises(DataError, match=r"bad.json: line 3, column 1 is not valid JSON: Expecting"):
        load_records(whole)


def test_records_that_are_not_objects_are_numbered_from_1(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text('[{"text": "a"}, 3, {"text": "b"}, "x"]')
    with pytest.raises(DataError, match=r"mixed.json: records \[2, 4\] \(numbered from 1\)"):
        load_records(path)


def test_an_empty_file_says_it_is_empty(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match=r"empty.jsonl holds no records .*the file is empty"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"blank.jsonl holds no records .*the file is blank"):
        load_records(tmp_path / "blank.jsonl")


def test_a_hub_id_says_hub_downloads_are_not_supported_and_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="hub downloads are not supported") as err:
        load_model("HuggingFaceTB/SmolLM2-135M")
    message = str(err.value)
    assert (
        "huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir models/SmolLM2-135M"
        in message
    )
    assert "--model models/SmolLM2-135M" in message and ".gguf" in message
    with pytest.raises(DataError, match=r"'no-such-dir' does not exist \(working directory") as err:
        load_model("no-such-dir")
    assert "downloads" not in str(err.value)  # a plain missing path is not called a hub id


def test_task_messages_number_records_from_1():
    from influscope.demo.train import train_tokenizer

    tok = train_tokenizer(["some text to train on"] * 4, vocab_size=300, min_frequency=1)
    inf = Influence(tiny_gpt2(), "causal_lm", tokenizer=tok, device="cpu")
    with pytest.raises(DataError, match=r"Record 3 has keys \['txt'\]"):
        inf.encode([{"text": "a b"}, {"text": "c d"}, {"txt": "e"}])
    with pytest.raises(DataError, match=r"Record 1 has a completion with no tokens"):
        inf.encode([{"prompt": "a", "completion": ""}])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _tokenizer():
    from influscope.demo.train import train_tokenizer

    tok = train_tokenizer(["one two three four five six"] * 4, vocab_size=300, min_frequency=1)
    tok.model_max_length = 4  # a 12-token text is "longer than the maximum" for it
    return tok


def test_truncate_silences_the_tokenizers_indexing_errors_warning(transformers_log):
    long = [{"text": " ".join(["one two three four five six"] * 2)}]
    inf = Influence(tiny_gpt2(n_positions=8), "causal_lm", tokenizer=_tokenizer(), device="cpu")
    data = inf.encode(long, truncate=True)
    assert data.max_length() == 8  # cut to the model's context
    assert not [m for m in transformers_log if "indexing errors" in m]
    # the control: the same tokenizer call outside encode(truncate=True) warns, so the
    # assertion above can fail; and the tokenizer's once-only flag was restored
    assert (
        "sequence-length-is-longer-than-the-specified-maximum"
        not in inf.tokenizer.deprecation_warnings
    )
    inf.tokenizer(long[0]["text"])
    assert [m for m in transformers_log if "indexing errors" in m]


def test_a_field_of_the_wrong_type_is_shown_whole_as_json():
    from influscope.tasks.data import text_field

    chat = [{"role": "user", "content": "What is the capital of Velmora? " * 3}]
    with pytest.raises(
        DataError, match=r"Record 2 field 'text' must be a string, received list"
    ) as err:
        text_field({"text": chat}, 1, "text")
    assert json.dumps(chat) in str(err.value)  # was cut at 60 characters of its repr
    with pytest.raises(DataError, match=r" … \(4002 characters in all\)"):
        text_field({"text": ["x" * 3998]}, 0, "text")  # 4002 characters of JSON
