"""Running the service: its composition, its shutdown, its supervisor."""
