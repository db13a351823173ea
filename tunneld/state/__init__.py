"""What tunneld leaves on disk: where files go, pid and state files, logs, autostart manifests."""
