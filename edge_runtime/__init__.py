"""The DICOM folder-watching segmentation daemon (no torch)."""
