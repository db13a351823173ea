"""What a host is: its ssh_config resolution, tunneld.toml's settings, credentials, addresses."""
