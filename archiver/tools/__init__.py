"""Tools around the service: a simulated bot, a load generator, the demo."""
