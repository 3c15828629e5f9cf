"""The contract between agent and coordinator: topics and message schemas.

Importing this package loads neither OpenCV nor SciPy nor a TFLite runtime.
"""

from lepton.protocol.messages import SCHEMA_VERSION, decode, encode
from lepton.protocol.topics import DEFAULT_PREFIX, Parsed, Topics, check_id

__all__ = ["DEFAULT_PREFIX", "SCHEMA_VERSION", "Parsed", "Topics", "check_id", "decode", "encode"]
