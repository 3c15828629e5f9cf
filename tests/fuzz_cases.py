"""What the fuzz tests share: a valid message with exactly one thing made wrong.

Used by tests/test_coordinator_fuzz.py (the coordinator's topics) and
tests/faults/test_rows_sec_fuzz.py (the agent's).
"""

from __future__ import annotations

import json
from typing import Callable

from hypothesis import strategies as st

# Values no lax coercion can turn into the field's type ("5" would pass as a number, None as an Optional).
WRONG = {str: [123, [], {}, None], int: ["abc", [], {}, None, 1.5], float: ["abc", [], {}, None],
         dict: ["x", 5, []], list: ["x", 5, {}]}


def one_thing_wrong(draw, data: dict, required: list[str], number: str,
                    wrong_id: Callable[[Callable, dict], None]) -> bytes:
    """*data* (a valid message as a dict) with one thing made wrong, as JSON: a field's type, a missing
    *required* field, an unknown key, the schema version, an id (``wrong_id(draw, data)`` changes it),
    or NaN/Infinity in the number field *number*. Call from inside an ``@st.composite`` with its *draw*."""
    how = draw(st.sampled_from(["type", "missing", "extra", "version", "id", "nan"]))
    if how == "type":
        key = draw(st.sampled_from(sorted(k for k in data if k != "v")))
        data[key] = draw(st.sampled_from(WRONG[type(data[key])]))
    elif how == "missing":
        del data[draw(st.sampled_from(required))]
    elif how == "extra":
        data[draw(st.sampled_from(["bogus", "Device", "seqq"]))] = 1
    elif how == "version":
        data["v"] = draw(st.sampled_from([0, 99, None, "one"]))  # no schema version anyone reads
    elif how == "id":
        wrong_id(draw, data)
    else:
        data[number] = 0.123456789
        return json.dumps(data).replace("0.123456789", draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))).encode()
    return json.dumps(data).encode()
