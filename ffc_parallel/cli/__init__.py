"""Console entry points: ffc-train, ffc-bench, ffc-plan, ffc-reshard, ffc-export."""
