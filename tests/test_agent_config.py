"""The agent's TOML config: defaults, strictness, one-line errors naming the key."""

from __future__ import annotations

import pytest

from lepton.agent.config import AgentConfig, load_config
from lepton.errors import ConfigError

GOOD = """
device_id = "cam-1"
[broker]
port = 1884
[outbox]
path = "/tmp/x/outbox.db"
[[sources]]
id = "cam0"
type = "synthetic"
fps = 5
[[streams]]
id = "digits-cam"
source = "cam0"
model = "digits-int8"
deadline_s = 2
"""


def write(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_good_config_reads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.broker.port == 1884 and cfg.broker.keepalive == 10 and cfg.client_id == "cam-1"
    assert cfg.outbox.max_rows == 100000 and cfg.outbox.policy == "drop-oldest"
    assert cfg.streams[0].deadline_s == 2 and cfg.sources[0]["fps"] == 5


def test_every_field_has_a_description_and_a_default():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, AgentConfig.__mro__[1]):
                walk(annotation)

    walk(AgentConfig)
    AgentConfig()  # every section defaults


@pytest.mark.parametrize("text, named", [
    (GOOD.replace("port = 1884", "prot = 1884"), "unknown key 'broker.prot'"),
    (GOOD.replace("port = 1884", "port = 70000"), "broker.port"),
    (GOOD.replace('device_id = "cam-1"', 'device_id = "cam/1"'), "device_id"),
    (GOOD.replace('source = "cam0"', 'source = "cam9"'), "streams[0].source: no source 'cam9'"),
    (GOOD.replace('type = "synthetic"', 'type = "webcam"'), "unknown type 'webcam'"),
    (GOOD.replace("fps = 5", "fps = -5"), "fps"),
    (GOOD + '[[streams]]\nid = "digits-cam"\nsource = "cam0"\nmodel = "digits"\n', "duplicate stream id"),
    (GOOD.replace("[outbox]", '[outbox]\npolicy = "drop-newest"'), "outbox.policy"),
    (GOOD.replace("[broker]", '[broker]\ntls_cert = "c.pem"\ntls_key = "k.pem"'), "tls_cert needs tls_ca"),
    ("device_id = ", "not valid TOML"),
    # TOML is typed: a bool or a quoted number where a number belongs is named, not coerced (true read as 1)
    (GOOD.replace("fps = 5", "fps = true"), "fps"),
    (GOOD.replace("port = 1884", 'port = "1884"'), "broker.port"),
    (GOOD.replace("deadline_s = 2", "deadline_s = false"), "deadline_s"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, named):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert named in message and "\n" not in message.strip()
    assert err.value.exit_code == 2


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def _float_fields(model, where=""):
    """(dotted path, section model, field name) of every float field of the config, nested sections included."""
    from pydantic import BaseModel

    section = AgentConfig.__mro__[1]
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, section):
            yield from _float_fields(annotation, f"{where}{name}.")
        elif annotation in (float, float | None):
            yield f"{where}{name}", name
        elif getattr(annotation, "__args__", None) and isinstance(annotation.__args__[0], type) \
                and issubclass(annotation.__args__[0], BaseModel):  # list[StreamConfig]
            yield from _float_fields(annotation.__args__[0], f"{where}{name}.0.")


FLOAT_FIELDS = sorted(path for path, _ in _float_fields(AgentConfig))


def test_the_float_fields_are_found():
    # The walk must see the fields the protocol refuses non-finite values in, and the stream fields.
    assert {"link.up_mbps", "link.down_mbps", "link.rtt_ms", "streams.0.deadline_s", "streams.0.slo_ms",
            "offload.expected_ms", "runtime.stall_s"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("path", FLOAT_FIELDS)
def test_no_float_field_takes_inf_or_nan(tmp_path, path, value):
    """inf passed every "> 0" bound: --check-config said ok, then the birth message (the protocol refuses inf)
    failed on every connect and the agent never went online; deadline_s = inf failed every frame."""
    import tomli_w
    import tomllib

    data = tomllib.loads(GOOD)
    *parents, key = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[key] = float(value)
    text = tomli_w.dumps(data)
    assert f"{key} = {value}" in text  # the file says it as an operator would write it
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert f"{path}: Input should be a finite number" in message and value in message, message
    assert err.value.exit_code == 2


def test_check_config_refuses_inf_with_exit_2(tmp_path, capsys):
    from lepton.cli import main

    path = write(tmp_path, GOOD.replace("[broker]", "[link]\nup_mbps = inf\n[broker]"))
    assert main(["agent", "--check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "link.up_mbps" in err and "finite" in err, err


def test_a_missing_broker_ca_is_named_by_the_key_the_config_has(tmp_path, capsys):
    """The model downloads fall back to broker.tls_ca: its error names that key, not models.http_ca (unset)."""
    from lepton.cli import main

    path = write(tmp_path, GOOD.replace("[broker]", f'[broker]\ntls_ca = "{tmp_path}/none.crt"'))
    assert main(["agent", "--check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broker.tls_ca" in err and "models.http_ca" not in err, err
    # The broker's CA is named as the broker's file, not as one "for model downloads" (checked first).
    # ... after the file's name, as the schema's errors are
    assert err == f"lepton: error: config {path}: broker.tls_ca {tmp_path}/none.crt: No such file or directory"


def test_check_config_names_the_file_for_a_model_it_does_not_have(tmp_path, capsys):
    from lepton.cli import main

    path = write(tmp_path, GOOD)
    text = path.read_text()
    model = next(line.split("=", 1)[1].strip().strip('"') for line in text.splitlines() if line.startswith("model ="))
    path.write_text(text.replace(f'model = "{model}"', 'model = "no-such-model"'))
    assert main(["agent", "--check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lepton: error: config {path}: streams[0].model: no model named 'no-such-model'"), err


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_check_config_refuses_a_model_file_that_is_missing_or_does_not_verify(tmp_path, capsys, damage):
    """--check-config said ok, then the daemon exited 1 at the model's load: named at check time now (exit 2)."""
    import shutil

    from lepton.cli import main
    from lepton.models.registry import default_registry

    zoo = default_registry()
    entry = zoo.get("digits-int8")
    shutil.copytree(entry.directory, tmp_path / "registry" / "digits-int8")
    model = tmp_path / "registry" / "digits-int8" / entry.path.name
    if damage == "missing":
        model.unlink()
    else:
        model.write_bytes(model.read_bytes()[:100])
    keys = ", ".join(f'"{k}"' for k in zoo.trusted_keys)
    path = write(tmp_path, GOOD + f'[models]\ndir = "{tmp_path}/registry"\ntrusted_keys = [{keys}]\n'
                 f'cache_dir = "{tmp_path}/cache"\n')
    assert main(["agent", "--check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lepton: error: config {path}: streams[0].model: model "
                                                         "digits-int8"), err
    assert ("cannot be read" if damage == "missing" else "size check failed") in err, err


def test_check_config_refuses_a_video_file_that_is_not_there(tmp_path, capsys):
    """Found at check time, not when the daemon starts (and exits 2 with every other stream)."""
    from lepton.cli import main

    missing = tmp_path / "nope.mp4"
    path = write(tmp_path, GOOD.replace('type = "synthetic"\nfps = 5', f'type = "video"\npath = "{missing}"'))
    assert main(["agent", "--check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lepton: error: config {path}: sources[0].path: no such file '{missing}' (source 'cam0', video)"


def test_check_config_compares_a_sensor_window_with_the_model(tmp_path, capsys, caplog):
    from lepton.cli import main

    sensor = GOOD.replace('type = "synthetic"\nfps = 5', 'type = "sensor"\nchannels = 2').replace(
        'model = "digits-int8"', 'model = "vibration"')
    assert main(["agent", "--check-config", str(write(tmp_path, sensor))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("streams[0]: model 'vibration' takes windows of 3 channel(s) but source 'cam0' gives 2"), err
    shorter = sensor.replace("channels = 2", "length = 64")
    assert main(["agent", "--check-config", str(write(tmp_path, shorter))]) == 0  # allowed, but said
    assert "takes windows of 256 samples; source 'cam0' gives 64, zero-padded to fit" in caplog.text


def test_check_config_json_fills_in_source_defaults(tmp_path, capsys):
    import json

    from lepton.cli import main

    assert main(["agent", "--check-config", str(write(tmp_path, GOOD)), "--json"]) == 0
    source = json.loads(capsys.readouterr().out)["sources"][0]
    assert source["fps"] == 5 and source["pattern"] == "digits" and "seed" in source and "width" in source


def test_json_without_check_config_is_refused_before_anything_starts(tmp_path, capsys):
    """`--json` only shapes --check-config's output; with --config it was ignored and the daemon started."""
    from lepton.cli import main

    path = tmp_path / "none.toml"  # refused before the config is read (a good one would start the daemon)
    assert main(["agent", "--config", str(path), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lepton: error: --json goes with --check-config (the daemon logs to stderr and prints no JSON)"
