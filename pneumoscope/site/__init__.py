"""A new site: calibrate a run's threshold on a labelled sample of its films, adapt the
model to them, and measure how far its films drift from the run's validation part."""
