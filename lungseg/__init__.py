"""lungseg: lung segmentation for portable chest radiographs, from training to the edge."""

__version__ = "0.3.1"
