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
