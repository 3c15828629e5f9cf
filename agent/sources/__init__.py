"""Where frames come from: camera, video file, synthetic frames, sensors.

One registry (``SOURCE_TYPES``) maps a config ``type`` to its config class
and source class; ``build_source(config)`` validates one ``[[sources]]``
entry and returns a source to ``start(stop)``. Each source keeps only its
latest frame; see ``base`` for the contract. Importing this package does not
import OpenCV.
"""

from lepton.agent.sources.base import Frame, Source, SourceConfig
from lepton.agent.sources.registry import SOURCE_TYPES, build_source, validate_source_config

__all__ = ["SOURCE_TYPES", "Frame", "Source", "SourceConfig", "build_source", "validate_source_config"]
