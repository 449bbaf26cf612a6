"""CNN architectures of the ensemble and the on-disk ensemble bundle (torch)."""
