"""Where models and text come from: embedded PyPI-shipped defaults, local files and folders, or a hub."""
