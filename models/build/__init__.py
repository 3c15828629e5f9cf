"""Scripts that reproduce the model zoo and the test models (need TensorFlow)."""
