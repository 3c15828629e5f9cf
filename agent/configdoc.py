"""The agent's configuration reference (docs/agent-config.md), written from the config models themselves.

    python -m lepton.agent.configdoc > docs/agent-config.md

A test keeps the committed file equal to what this prints, so the reference
cannot drift from the code: every key, its type, default and description.
Sources are documented per type in docs/sources.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lepton.agent.config import AgentConfig, StreamConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "agent.toml"

HEAD = """# Agent configuration reference

`lepton agent --config FILE` reads one TOML file. Unknown keys are refused (a
typo never passes as a default), so are values of the wrong TOML type
(`port = "1883"`, `fps = true`; an integer is fine for a float), and `lepton agent --check-config FILE` exits
0, or 2 with one line naming the bad key; `--check-config FILE --json` prints
the whole configuration with every default filled in. This page is written
from the code (`python -m lepton.agent.configdoc > docs/agent-config.md`).

A complete example, which `--check-config` accepts:
[docs/examples/agent.toml](examples/agent.toml). Source types and their keys
are in [sources.md](sources.md); what a provisioned device gets is in
[deploy.md](deploy.md).
"""


def _type(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f'"{a}"' for a in get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace(" | None", "").replace("Optional[", "").replace(" | ", " or ")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return ""
        if callable(field.default_factory) and field.default_factory.__name__ == "default_device_id":
            return "the host name"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue  # a table of its own
        desc = (field.description or "").replace("|", "\\|")
        default = _default(field)
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {f'`{default}`' if default else ''} | {desc} |")
    return rows


def _table(title: str, model: type[BaseModel], intro: str = "") -> list[str]:
    out = [f"## {title}", ""]
    if intro:
        out += [intro, ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    return out + _rows(model) + [""]


def render() -> str:
    lines = [HEAD, "## top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [row for row in _rows(AgentConfig) if not row.startswith(("| `sources`", "| `streams`"))]
    lines.append("")
    for name, field in AgentConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            about = field.description or ""
            lines += _table(f"[{name}]", ann, about[:1].upper() + about[1:] + ".")
    lines += ["## [[sources]]", "",
              "One table per source: `id` and `type` (camera, video, synthetic, sensor), then the type's own",
              "keys, listed with their defaults in [sources.md](sources.md).", ""]
    lines += _table("[[streams]]", StreamConfig, "One table per stream: source -> model -> results, published "
                    "on the stream's results topic ([protocol.md](protocol.md)).")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
