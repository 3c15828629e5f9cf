"""docs/protocol.md stays true: every example line is a valid message for its topic."""

from __future__ import annotations

import json
from pathlib import Path

from lepton.protocol import Topics, decode
from lepton.protocol.offload import OffloadHeader

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_every_example_in_the_protocol_doc_validates():
    topics = Topics()
    kinds = set()
    for line in DOC.read_text().splitlines():
        if line.startswith(topics.prefix + "/"):
            topic, payload = line.split(" ", 1)
            kind = topics.parse(topic).kind
            dumped = json.loads(decode(kind, payload).model_dump_json(exclude_none=True))
            assert {k: dumped[k] for k in json.loads(payload)} == json.loads(payload), line
            kinds.add(kind)
        elif line.startswith('{"v":1,"origin"'):
            OffloadHeader.model_validate_json(line)
            kinds.add("offload")
    assert kinds == {"status", "telemetry", "desired", "reported", "results", "acks", "replies", "coordinator",
                     "offload"}


def test_the_agent_config_reference_is_what_the_code_says():
    """docs/agent-config.md is written from the config models: regenerate it when a key changes
    (python -m lepton.agent.configdoc > docs/agent-config.md)."""
    from lepton.agent.configdoc import render

    committed = (DOC.parent / "agent-config.md").read_text()
    assert committed == render(), "docs/agent-config.md is stale: python -m lepton.agent.configdoc > docs/agent-config.md"
    from lepton.agent.config import AgentConfig

    for section in ("broker", "outbox", "runtime", "telemetry", "metrics", "models", "link", "offload"):
        for key in AgentConfig.model_fields[section].annotation.model_fields:
            assert f"| `{key}` |" in committed, f"[{section}] {key} is not in the reference"


def test_the_example_agent_config_passes_check_config():
    import subprocess
    import sys

    example = DOC.parent / "examples" / "agent.toml"
    out = subprocess.run([sys.executable, "-m", "lepton.cli", "agent", "--check-config", str(example)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 stream(s)" in out.stdout
