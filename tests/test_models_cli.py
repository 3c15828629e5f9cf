"""``lepton models ...`` as a user runs it: exit codes, messages, JSON that parses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.cli import main
from lepton.models.registry import zoo_dir

SPEC = {
    "family": "digits",
    "labels": [str(i) for i in range(10)],
    "preprocess": {"kind": "image", "image": {"color": "gray", "interpolation": "area"}},
    "postprocess": {"kind": "classification"},
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def zoo_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(zoo_dir(), tmp_path / "zoo"))


def test_verify_passes_on_the_committed_zoo_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "lepton.cli", "models", "verify"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 6 model version(s) verified" in proc.stdout


def test_verify_fails_after_one_flipped_model_byte(capsys, zoo_copy):
    model = zoo_copy / "mobilenet96" / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0x80
    model.write_bytes(bytes(data))
    code, out, _ = run(capsys, "models", "verify", "--registry", str(zoo_copy), "--key", str(zoo_copy / "zoo.pub"))
    assert code == 1
    assert "FAILED  model mobilenet96 1.0.0: sha256 check failed" in out
    assert "ok      digits 1.0.0" in out


def test_verify_fails_after_one_flipped_signature_byte(capsys, zoo_copy):
    path = zoo_copy / "digits" / "manifest.json"
    text = path.read_text()
    start = text.index('"signature": "') + len('"signature": "')
    flipped = "B" if text[start + 5] != "B" else "C"  # still base64, different bytes
    path.write_text(text[: start + 5] + flipped + text[start + 6 :])
    code, out, _ = run(capsys, "models", "verify", "digits", "--registry", str(zoo_copy),
                       "--key", str(zoo_copy / "zoo.pub"), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and len(report["models"]) == 1
    assert "signature check failed" in report["models"][0]["problem"]


def test_verify_with_a_wrong_key_fails(capsys, tmp_path):
    assert run(capsys, "models", "keygen", "--out", str(tmp_path / "other"))[0] == 0
    code, out, _ = run(capsys, "models", "verify", "--key", str(tmp_path / "other.pub"))
    assert code == 1 and "which is not trusted" in out


def test_read_commands_print_json(capsys):
    code, out, _ = run(capsys, "models", "list", "--json")
    listed = json.loads(out)
    assert code == 0 and {m["name"] for m in listed["models"]} >= {"digits", "mobilenet224"}
    assert all(m["verified"] for m in listed["models"])
    code, out, _ = run(capsys, "models", "inspect", "vibration-int8", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["verified"] and shown["inputs"][0]["shape"] == [1, 129, 3]
    code, out, _ = run(capsys, "models", "inspect", str(zoo_dir() / "digits" / "model.tflite"), "--json")
    assert code == 0 and json.loads(out)["inputs"][0]["dtype"] == "float32"


def test_eval_family_prints_both_digit_variants(capsys):
    code, out, _ = run(capsys, "models", "eval", "digits")
    assert code == 0
    lines = [line for line in out.splitlines() if line]
    assert [line.split()[0] for line in lines] == ["digits", "digits-int8"]
    for line in lines:
        assert float(line.split("accuracy ")[1].split()[0]) >= 0.97
    code, out, _ = run(capsys, "models", "eval", "vibration-int8", "--json")
    (result,) = json.loads(out)
    assert code == 0 and result["measured"]["recall"] >= 0.9


def test_eval_of_an_untrained_model_says_why(capsys):
    code, _, err = run(capsys, "models", "eval", "mobilenet96")
    assert code == 1 and "nothing to evaluate: it is untrained" in err


def test_bench_writes_a_compute_profile(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    code, out, _ = run(capsys, "models", "bench", "digits-int8", "--iterations", "30", "--out", str(out_file), "--json")
    printed = json.loads(out)
    saved = json.loads(out_file.read_text())
    assert code == 0 and saved["model"] == "digits-int8" and saved["iterations"] == 30
    assert 0 < saved["p50_ms"] <= saved["p95_ms"] <= saved["p99_ms"] and saved["invoke_ms"] == saved["p50_ms"]
    assert saved["throughput_per_s"] > 0 and printed["profile"] == str(out_file)
    assert run(capsys, "models", "bench", "digits", "--iterations", "0")[0] == 2


def test_keygen_add_sign_verify_round_trip(capsys, tmp_path):
    keys, reg = tmp_path / "keys" / "fleet", tmp_path / "reg"
    assert run(capsys, "models", "keygen", "--out", str(keys))[0] == 0
    code, _, err = run(capsys, "models", "keygen", "--out", str(keys))
    assert code == 2 and "already exists" in err
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    source = str(zoo_dir() / "digits-int8" / "model.tflite")
    add = ["models", "add", source, "--name", "ocr", "--spec", str(spec), "--key", f"{keys}.key",
           "--registry", str(reg), "--trust", f"{keys}.pub"]
    code, out, _ = run(capsys, *add, "--version", "2.0.0", "--json")
    assert code == 0 and json.loads(out)["version"] == "2.0.0"
    code, _, err = run(capsys, *add, "--version", "1.5.0")
    assert code == 1 and "version check failed: older than version 2.0.0" in err
    verify = ["models", "verify", "--registry", str(reg), "--key", f"{keys}.pub"]
    assert run(capsys, *verify)[0] == 0
    manifest = reg / "ocr" / "2.0.0" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["notes"] = "edited after signing"
    manifest.write_text(json.dumps(data))
    assert run(capsys, *verify)[0] == 1
    assert run(capsys, "models", "sign", str(manifest), "--key", f"{keys}.key")[0] == 0
    assert run(capsys, *verify)[0] == 0
    assert run(capsys, *add, "--version", "2.1.0")[2] == ""  # the same key as 2.0.0: no warning
    stranger = tmp_path / "keys" / "stranger"
    run(capsys, "models", "keygen", "--out", str(stranger))
    code, _, err = run(capsys, *[a if a != f"{keys}.key" else f"{stranger}.key" for a in add], "--version", "2.2.0")
    assert code == 0 and "warning: ocr 2.2.0 is signed by key" in err and "devices that trust only those" in err


def test_sign_refuses_a_manifest_whose_file_does_not_match(capsys, zoo_copy, tmp_path):
    run(capsys, "models", "keygen", "--out", str(tmp_path / "k"))
    (zoo_copy / "digits" / "model.tflite").write_bytes(b"TFL3" * 10)
    code, _, err = run(capsys, "models", "sign", str(zoo_copy / "digits" / "manifest.json"), "--key", str(tmp_path / "k.key"))
    assert code == 1 and "size check failed" in err


def test_bad_arguments_are_named(capsys, tmp_path):
    code, _, err = run(capsys, "models", "list", "--registry", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err
    code, _, err = run(capsys, "models", "inspect", "no-such-model")
    assert code == 1 and "no model named 'no-such-model'" in err
    for path in (str(tmp_path / "nope.tflite"), "nope.tflite", str(tmp_path / "dir" / "model")):
        code, _, err = run(capsys, "models", "inspect", path)
        assert (code, err.strip()) == (2, f"lepton: error: {path}: file not found")
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text("{not json")
    code, _, err = run(capsys, "models", "add", str(zoo_dir() / "digits" / "model.tflite"), "--name", "x",
                       "--version", "1", "--spec", str(bad_spec), "--key", str(tmp_path / "none.key"),
                       "--registry", str(tmp_path / "reg"))
    assert code == 2 and "none.key" in err  # the key is read first: nothing is described or written
    assert not (tmp_path / "reg").exists()


def test_keygen_into_a_directory_that_cannot_be_made_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "keys" / "fleet"  # under a regular file: no directory can be made there
    code, _, err = run(capsys, "models", "keygen", "--out", str(out))
    assert code == 2
    assert err.strip() == f"lepton: error: --out {out}: cannot create directory {out.parent}: Not a directory"


@pytest.mark.parametrize("flags, level", [((), "INFO"), (("-v",), "DEBUG"), (("-vv",), "DEBUG")])
def test_verbose_flag_turns_on_debug_logging(flags, level):
    """`lepton -v ...` logs debug lines; it once set the INFO level the default already had, and changed nothing."""
    script = ("import logging; from lepton.cli import build_parser, setup_logging; "
              f"args = build_parser().parse_args({[*flags, 'models', 'list']!r}); setup_logging(args.verbose); "
              "print(logging.getLevelName(logging.getLogger().level))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == level


def test_verify_of_a_registry_with_no_models_fails(capsys, tmp_path):
    """A --registry that points at the wrong directory must not pass as "all 0 model version(s) verified"."""
    code, out, err = run(capsys, "models", "verify", "--registry", str(tmp_path))
    assert code == 1 and out == ""
    assert err.strip() == f"lepton: error: no model versions in registry {tmp_path}: nothing to verify"
