"""Engine, sessions and the connection budget."""
