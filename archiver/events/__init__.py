"""The events archive: one log per recording (`log`), and the archive of them (`archive`)."""
