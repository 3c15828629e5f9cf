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
