"""Labelled radiograph collections (PadChest, NIH ChestX-ray14, plain CSV) and their torch datasets."""
