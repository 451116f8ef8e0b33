"""Training networks that survive the chip: the Lightning module, HA-SGD and its methods."""
