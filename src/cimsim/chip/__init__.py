"""The chip: its typed config, the analog layers, the periphery and the devices."""
