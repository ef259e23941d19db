"""What the machine and ECS give a process: its slot of the spool, task protection, and
freed memory handed back."""
