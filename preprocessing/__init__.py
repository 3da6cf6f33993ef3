"""Dataset preparation and tiling: the work of ScalePT's preprocessing array jobs."""
