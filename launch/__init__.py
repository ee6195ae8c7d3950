"""Training program and process management for the two-tower AlexNet."""
