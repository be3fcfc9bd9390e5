"""Load generator, report and plots of ``layerkv bench`` (torch-free; matplotlib only for plots)."""
