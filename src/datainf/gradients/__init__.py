"""Per-example gradients: the losses (tasks), their collection, the on-disk store."""
