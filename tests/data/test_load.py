"""load_rows: every source format, column mapping, and the errors a user sees."""

import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poise.data import Row, load_rows
from poise.errors import ConfigError, DataError, PoiseError

ROWS = [
    {"prompt": "What is 2+2?", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "Capital of France?", "chosen": " Paris, of course.", "rejected": ' "London", I think.'},
    {"prompt": "Say hi\nin two lines", "chosen": " hi\nthere", "rejected": " no, é ü 🙂"},
]
CONVERSATIONS = [
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
]


def _write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def _write(fmt, tmp_path, rows):
    """Write rows in format ``fmt``; returns (source, load_rows kwargs)."""
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json-list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt in ("json-data", "json-train"):
        path = tmp_path / "d.json"
        path.write_text(json.dumps({fmt.split("-")[1]: rows, "meta": 1}), encoding="utf-8")
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt in ("csv", "tsv"):
        path = tmp_path / f"d.{fmt}"
        _write_csv(path, rows, "\t" if fmt == "tsv" else ",")
    elif fmt == "saved-dataset":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "saved-dict":
        path = tmp_path / "saved_dict"
        dd = datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows)}
        )
        dd.save_to_disk(str(path))
        return path, {"split": "test"}
    return path, {}


ALL_FORMATS = [
    "jsonl",
    "json-list",
    "json-data",
    "json-train",
    "parquet",
    "csv",
    "tsv",
    "saved-dataset",
    "saved-dict",
]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_format_loads_the_same_rows(fmt, tmp_path):
    path, kwargs = _write(fmt, tmp_path, ROWS)
    rows = load_rows(path, **kwargs)
    assert [row.data for row in rows] == ROWS
    assert [row.index for row in rows] == [1, 2, 3]
    assert all(row.source == str(path) for row in rows)
    assert {row.unit for row in rows} == {"line" if fmt == "jsonl" else "row"}


@pytest.mark.parametrize("fmt", ["jsonl", "json-list", "parquet", "saved-dataset"])
def test_conversational_rows_survive_every_structured_format(fmt, tmp_path):
    path, kwargs = _write(fmt, tmp_path, CONVERSATIONS)
    assert [row.data for row in load_rows(path, **kwargs)] == CONVERSATIONS


def test_jsonl_index_is_the_line_number_and_blank_lines_are_skipped(write_jsonl):
    path = write_jsonl([ROWS[0], "", "   ", ROWS[1]])
    rows = load_rows(path)
    assert [row.index for row in rows] == [1, 4]
    assert rows[1].where == f"{path}, line 4"


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    rows = load_rows(path)
    assert [row.data for row in rows] == ROWS and rows[0].unit == "line"


def test_json_object_keyed_by_split(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"validation": ROWS[:2], "train": ROWS}), encoding="utf-8")
    assert len(load_rows(path, split="validation")) == 2
    assert len(load_rows(path)) == 3


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert load_rows(path)[0].data == ROWS[0]


def test_column_mapping_renames_and_keeps_other_columns(write_jsonl):
    raw = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "id": i}
        for i, r in enumerate(ROWS)
    ]
    rows = load_rows(write_jsonl(raw), columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert [{k: row.data[k] for k in ("prompt", "chosen", "rejected")} for row in rows] == ROWS
    assert [row.data["id"] for row in rows] == [0, 1, 2]
    assert "good" not in rows[0].data


def test_column_mapping_of_one_column(write_jsonl):
    raw = [{"prompt": r["prompt"], "chosen": r["chosen"], "worse": r["rejected"]} for r in ROWS]
    assert [row.data for row in load_rows(write_jsonl(raw), columns={"rejected": "worse"})] == ROWS


def test_unknown_mapping_name_is_a_config_error(write_jsonl):
    with pytest.raises(ConfigError, match="unknown name 'answer'"):
        load_rows(write_jsonl(ROWS), columns={"answer": "chosen"})


def test_missing_column_suggests_a_close_name_and_the_mapping(write_jsonl):
    raw = [{"prompt": r["prompt"], "choosen": r["chosen"], "rejected": r["rejected"]} for r in ROWS]
    path = write_jsonl(raw)
    with pytest.raises(DataError) as info:
        load_rows(path)
    message = str(info.value)
    assert message.startswith(f"{path}: no column 'chosen'")
    assert "Did you mean 'choosen'?" in message
    assert "columns: {chosen: choosen}" in message


def test_mapped_column_that_does_not_exist(write_jsonl):
    with pytest.raises(DataError, match=r"maps 'prompt' to 'questoin'.*no column 'questoin'"):
        load_rows(write_jsonl(ROWS), columns={"prompt": "questoin"})


def test_missing_column_without_a_close_name(tmp_path):
    path = tmp_path / "d.csv"
    _write_csv(path, [{"prompt": "p", "chosen": "a", "zzz": "b"}])
    with pytest.raises(DataError, match="no column 'rejected'") as info:
        load_rows(path)
    assert "Did you mean" not in str(info.value)


def test_broken_jsonl_line_is_reported_with_its_number(write_jsonl):
    path = write_jsonl([ROWS[0], ROWS[1], '{"prompt": "x" "chosen": "y"}', ROWS[2]])
    with pytest.raises(DataError) as info:
        load_rows(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line 3: not valid JSON (Expecting ','")
    assert message.endswith("Fix or delete the line.")


def test_jsonl_line_that_is_not_an_object(write_jsonl):
    with pytest.raises(DataError, match=r"line 2: expected a JSON object .* got a list"):
        load_rows(write_jsonl([ROWS[0], "[1, 2]"]))


def test_broken_json_file_reports_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json, line 3: not valid JSON"):
        load_rows(path)


def test_json_object_without_a_row_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")
    with pytest.raises(DataError, match=r"found an object with keys 'rows'"):
        load_rows(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.json"])
def test_non_utf8_bytes_are_reported_with_the_line(tmp_path, name):
    path = tmp_path / name
    first = (
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
        if name != "d.csv"
        else b"prompt,chosen,rejected\n"
    )
    path.write_bytes(first + b'"caf\xe9 latin-1"\n')
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8 \(byte 0xe9") as info:
        load_rows(path)
    assert str(info.value).startswith(str(path)) and "UTF-8" in str(info.value)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"the file is empty"):
        load_rows(path)


def test_blank_jsonl_and_header_only_csv(tmp_path, write_jsonl):
    with pytest.raises(DataError, match="only blank lines"):
        load_rows(write_jsonl(["", "  "]))
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no rows"):
        load_rows(path)


def test_missing_file_suggests_a_close_name_and_never_asks_the_hub(tmp_path, write_jsonl, monkeypatch):
    write_jsonl(ROWS, name="prefs.jsonl")

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(DataError) as info:
        load_rows(tmp_path / "pref.jsonl")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'pref.jsonl'}: no such file")
    assert f"Did you mean '{tmp_path / 'prefs.jsonl'}'?" in message
    with pytest.raises(DataError, match="no such file"):
        load_rows("no_such_dir/data.parquet")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_rows("someone/prefs", split="test")
    assert calls == [("someone/prefs", "test")]
    assert [row.data for row in rows] == ROWS and rows[0].source == "someone/prefs"


def test_hub_failure_is_a_clear_data_error(monkeypatch):
    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"no_such_dataset_xyz: not a local file or folder.*ConnectionError: no network"
    ):
        load_rows("no_such_dataset_xyz")


def test_unknown_suffix_and_plain_folder(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        load_rows(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_rows(folder)


def test_missing_split_of_a_dataset_dict(tmp_path):
    path, _ = _write("saved-dict", tmp_path, ROWS)
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        load_rows(path, split="validation")


def test_damaged_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_rows(path)


def test_errors_are_value_errors_and_poise_errors():
    assert issubclass(DataError, ValueError) and issubclass(DataError, PoiseError)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, PoiseError)


def test_row_is_frozen():
    row = Row("f.jsonl", 3, {"chosen": "a"}, "line")
    with pytest.raises(AttributeError):
        row.index = 4
    assert row.where == "f.jsonl, line 3"


def _hub_error(name):
    return type(name, (Exception,), {})


@pytest.mark.parametrize("error,match", [
    (_hub_error("RepositoryNotFoundError")("404"), r"^some-prefs: no such file or folder here .*has no dataset"),
    (_hub_error("ConnectError")("Name or service not known"), r"^some-prefs: no such file or folder here .*cannot "
                                                              r"be reached"),
])
def test_a_hub_dataset_name_is_asked_for_once_without_retries(monkeypatch, tmp_path, error, match):
    """load_dataset retries an unreachable Hub for half a minute; one request says what is wrong first."""
    import huggingface_hub

    calls = []

    def dataset_info(self, name, timeout=None):
        calls.append(name)
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(DataError, match=match):
        load_rows("some-prefs")
    assert calls == ["some-prefs"]


def test_rows_without_the_preference_columns_when_none_are_required(write_jsonl):
    path = write_jsonl([{"prompt": "a", "completion": " b"}])
    with pytest.raises(DataError, match="no column 'chosen'"):
        load_rows(str(path))
    assert load_rows(str(path), required=())[0].data == {"prompt": "a", "completion": " b"}
