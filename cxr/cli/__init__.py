"""The `cxr` console command."""
