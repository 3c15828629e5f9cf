"""Run a generated mosquitto.conf (e.g. `lepton provision`'s) under the harness.

``ConfFileBroker`` is a ``MosquittoBroker`` (start, stop, SIGKILL, restart
on the same port and data) whose config is a given file's text with only
what a test must own rewritten: the listener moved to the test's address and
port, the user kept as whoever runs the test, persistence into the test's
directory; ``settings`` replace or add any other global line (e.g.
``{"persistence": "false", "max_queued_messages": "1000"}`` for a row variant).
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass, field
from pathlib import Path

from lepton.broker import MosquittoBroker


def rewrite_conf(text: str, host: str, port: int, workdir: Path, settings: dict[str, str] | None = None) -> str:
    """*text* with its single listener, user and persistence location made the test's, and *settings* applied."""
    text, n = re.subn(r"^listener \d+.*$", f"listener {port} {host}", text, flags=re.M)
    if n != 1:
        raise ValueError(f"expected exactly one listener line in the broker config, found {n}")
    lines = text.splitlines()
    wanted = {"user": getpass.getuser(), "persistence_location": f"{workdir}/", **(settings or {})}
    first_listener = next(i for i, line in enumerate(lines) if line.startswith("listener "))
    for key, value in wanted.items():
        rx = re.compile(rf"^{re.escape(key)}\s")
        hits = [i for i, line in enumerate(lines) if rx.match(line)]
        if hits:
            for i in hits:
                lines[i] = f"{key} {value}"
        else:  # global options go before the listener block
            lines.insert(first_listener, f"{key} {value}")
            first_listener += 1
    return "\n".join(lines) + "\n"


@dataclass
class ConfFileBroker(MosquittoBroker):
    """A MosquittoBroker running *conf_text* (see ``rewrite_conf``)."""

    conf_text: str = ""
    settings: dict[str, str] = field(default_factory=dict)

    def config_text(self) -> str:
        return rewrite_conf(self.conf_text, self.host, self.port, self.workdir, self.settings)
