"""Console entry points: ffc-train, ffc-plan, ffc-reshard, ffc-export."""
