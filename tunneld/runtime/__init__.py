"""What runs a host: the detached supervisor, its waits and checks, stopping it."""
