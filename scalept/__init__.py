"""ScalePT: tiled PTv3 semantic segmentation of large LiDAR point clouds on Slurm clusters."""

__version__ = "0.1.0"
