"""A corpus of bad inputs: each gives one line naming the file, record, field or option, exit code 2, and no
traceback — or, where the input is merely unusual, a counted skip/drop/truncation and exit code 0."""

from __future__ import annotations

import json

import pytest

from elmtune.cli import main
from tests.helpers import word_tokenizer

GOOD = {"instruction": "say", "input": "a", "output": "b"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    word_tokenizer().save(directory)
    return directory


def run(capsys, args) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_run(tokenizer_dir, tmp_path, data, *extra):
    return ["train", "--model", "openelm-270m", "--tokenizer", str(tokenizer_dir), "--data", str(data), "--fields",
            "zh", "--output-dir", str(tmp_path / "out"), "--dry-run", "--max-length", "32", *extra]


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


BAD_DATA = [  # (file name, content, fragments the one-line error must contain)
    ("unclosed.json", '[{"instruction": "a", "input": "", "output": "b"},\n{"instruction": ', ["unclosed.json", "line 2"]),
    ("cut.jsonl", json.dumps(GOOD) + '\n{"instruction": "a", "out', ["cut.jsonl", "line 2", "invalid JSON"]),
    ("array-line.jsonl", json.dumps(GOOD) + "\n[1, 2]\n", ["array-line.jsonl", "line 2", "JSON object"]),
    ("int.json", json.dumps([GOOD, {**GOOD, "output": 5}]), ["int.json", "record 1", "'output'", "got int"]),
    ("list.json", json.dumps([{**GOOD, "instruction": ["x"]}]), ["list.json", "record 0", "'instruction'", "list"]),
    ("dict.jsonl", json.dumps({**GOOD, "input": {"a": 1}}), ["dict.jsonl", "record 0", "'input'", "dict"]),
    ("no-output.json", json.dumps([GOOD, {"instruction": "a", "input": ""}]), ["record 1", "missing field 'output'"]),
    ("no-instr.jsonl", json.dumps({"input": "", "output": "x"}), ["record 0", "missing field 'instruction'"]),
    ("empty.json", "", ["empty.json", "empty"]),
    ("blank.jsonl", " \n\t\n  ", ["blank.jsonl", "empty"]),
    ("latin1.json", b'[{"instruction": "caf\xe9", "input": "", "output": "b"}]', ["latin1.json", "not valid UTF-8"]),
    ("dupe.json", '[{"instruction": "a", "input": "", "output": "b", "output": "c"}]', ["dupe.json", "'output' twice"]),
    ("object.json", json.dumps(GOOD), ["object.json", "single object"]),
    ("scalar.json", "3", ["scalar.json", "found int"]),
    ("table.tsv", "a\tb\n", ["table.tsv", "unsupported file type .tsv"]),
    ("header-only.csv", "instruction,input,output\n", ["no records found", "header-only.csv"]),
    ("ragged.csv", "instruction,input,output\na,b\n", ["ragged.csv", "record 0 (line 2)", "has 2 cells"]),
    ("dupe.jsonl", '{"instruction": "a", "instruction": "b", "input": "", "output": "c"}', ["line 1", "twice"]),
]


@pytest.mark.parametrize("name, content, fragments", BAD_DATA, ids=[case[0] for case in BAD_DATA])
def test_bad_data_files(capsys, tmp_path, tokenizer_dir, name, content, fragments):
    code, _, err = run(capsys, dry_run(tokenizer_dir, tmp_path, write(tmp_path / name, content)))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(f in err for f in fragments), err


def test_missing_path_and_empty_directory(capsys, tmp_path, tokenizer_dir):
    code, _, err = run(capsys, dry_run(tokenizer_dir, tmp_path, tmp_path / "nope.json"))
    assert code == 2 and "nope.json: no such file or directory" in err
    (tmp_path / "empty-dir").mkdir()
    code, _, err = run(capsys, dry_run(tokenizer_dir, tmp_path, tmp_path / "empty-dir"))
    assert code == 2 and "no .json or .jsonl files" in err


def test_skip_counts_bad_records(capsys, tmp_path, tokenizer_dir):
    data = write(tmp_path / "mixed.jsonl", "\n".join([json.dumps(GOOD), "{oops", json.dumps({"instruction": "x"}),
                                                      json.dumps({**GOOD, "output": 1}), json.dumps(GOOD)]))
    code, out, _ = run(capsys, dry_run(tokenizer_dir, tmp_path, data, "--on-bad-record", "skip"))
    assert code == 0 and '"skipped_bad": 3' in out and '"kept": 2' in out
    all_bad = write(tmp_path / "bad.jsonl", "{oops\n[1]\n")
    code, _, err = run(capsys, dry_run(tokenizer_dir, tmp_path, all_bad, "--on-bad-record", "skip"))
    assert code == 2 and "no usable training examples" in err and "2 bad" in err


def test_unusual_but_valid_data_is_counted(capsys, tmp_path, tokenizer_dir):
    bom = write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert run(capsys, dry_run(tokenizer_dir, tmp_path, bom))[0] == 0
    huge = write(tmp_path / "huge.jsonl", json.dumps({**GOOD, "output": "a " * 500_000}))
    code, out, _ = run(capsys, dry_run(tokenizer_dir, tmp_path, huge))
    assert code == 0 and '"truncated": 1' in out
    long_prompt = write(tmp_path / "long.jsonl", "\n".join([json.dumps({**GOOD, "instruction": "say " * 100}),
                                                            json.dumps(GOOD)]))
    code, out, _ = run(capsys, dry_run(tokenizer_dir, tmp_path, long_prompt))
    assert code == 0 and '"dropped_all_masked": 1' in out and '"kept": 1' in out
    empty_answers = write(tmp_path / "empty-answers.jsonl", "\n".join(json.dumps({**GOOD, "output": ""})
                                                                       for _ in range(3)))
    code, out, _ = run(capsys, dry_run(tokenizer_dir, tmp_path, empty_answers))
    assert code == 0 and '"supervised_tokens": 3' in out  # only the eos of each: still learned
    only_long = write(tmp_path / "only-long.jsonl", json.dumps({**GOOD, "instruction": "say " * 100}))
    code, _, err = run(capsys, dry_run(tokenizer_dir, tmp_path, only_long))
    assert code == 2 and "no usable training examples" in err and "1 dropped with no answer left" in err


BAD_CONFIG = [  # (YAML text, fragments)
    ("learning_rate: 0.1\n", ["run.yaml", "unknown option 'learning_rate'"]),
    ("lora_r: sixteen\n", ["run.yaml", "'lora_r'", "expected an integer"]),
    ("precision: fp8\n", ["run.yaml", "'fp8' is not one of"]),
    ("lr: [1, 2]\n", ["run.yaml", "'lr'", "expected a number"]),
    ("lora_r: 8\n  lr: 1\n", ["run.yaml", "invalid YAML at line 2"]),
    ("- lr: 1\n", ["run.yaml", "expected a mapping"]),
    ("packing: maybe\n", ["run.yaml", "'packing'", "true or false"]),
    ("batch_size: 0\n", ["option 'batch_size' must be at least 1"]),
    ("lora_dropout: 1.5\n", ["option 'lora_dropout' must be in [0, 1)"]),
]


@pytest.mark.parametrize("text, fragments", BAD_CONFIG, ids=[c[0].split(":")[0].strip("- ") for c in BAD_CONFIG])
def test_bad_config_files(capsys, tmp_path, tokenizer_dir, text, fragments):
    config = write(tmp_path / "run.yaml", text)
    data = write(tmp_path / "d.jsonl", json.dumps(GOOD))
    code, _, err = run(capsys, [*dry_run(tokenizer_dir, tmp_path, data), "-c", str(config)])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(f in err for f in fragments), err


BAD_ARGS = [  # (extra arguments, fragments)
    (["--lora-r", "abc"], ["--lora-r", "invalid int value"]),
    (["--precision", "fp8"], ["--precision", "invalid choice"]),
    (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    (["--model", "no-such-model"], ["'no-such-model' is neither a preset"]),
    (["--tokenizer", "/no/such/dir"], ["tokenizer '/no/such/dir'", "no such directory"]),
    (["--val-size", "50"], ["--val-size 50.0 leaves no training examples"]),
    (["--template", "no placeholder"], ["--template 'no placeholder'"]),
    (["--fields", "question=q"], ["--fields 'question=q'"]),
    (["-c", "/no/such.yaml"], ["/no/such.yaml: config file not found"]),
]


@pytest.mark.parametrize("extra, fragments", BAD_ARGS, ids=[" ".join(c[0]) for c in BAD_ARGS])
def test_bad_command_line_arguments(capsys, tmp_path, tokenizer_dir, extra, fragments):
    data = write(tmp_path / "d.jsonl", json.dumps(GOOD))
    code, _, err = run(capsys, [*dry_run(tokenizer_dir, tmp_path, data), *extra])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(f in err for f in fragments), err


def test_debug_shows_the_traceback(capsys, tmp_path, tokenizer_dir):
    with pytest.raises(ValueError):
        main(["--debug", *dry_run(tokenizer_dir, tmp_path, write(tmp_path / "e.json", ""))])


def test_generate_checks_its_prompts_before_loading_any_model(tmp_path, capsys, monkeypatch):
    import elmtune.inference

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompts were checked")

    monkeypatch.setattr(elmtune.inference, "load_pipeline", no_loading)
    code, _, err = run(capsys, ["generate", "--model", "openelm-270m", "-p", "x", "-p", "y", "--input", "z"])
    assert code == 2 and "--input goes with exactly one --prompt" in err
    bad = write(tmp_path / "prompts.jsonl", '{"instruction": "a", "input": ""}\n{"instruction": 3, "input": ""}\n')
    code, _, err = run(capsys, ["generate", "--model", "openelm-270m", "--prompts", str(bad), "--fields", "zh"])
    assert code == 2 and "prompts.jsonl" in err and "record 1" in err
