"""What belongs to a recording as a whole: its session.json index (with the grace before it
is complete) and the notice that it is ready."""
