"""Weight devices: the Device protocol, its registry and the built-in devices."""
