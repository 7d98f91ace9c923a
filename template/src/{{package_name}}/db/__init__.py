"""Engine, sessions and the start-up guard of the connection budget."""
