"""lepton-edge: run TFLite models on fleets of small devices."""

__version__ = "0.1.0"
