"""Start a host's tunnel at login: systemd user units, launchd agents, XDG autostart entries.

Each mechanism renders its files, then asks the service manager to act through a Runner (the one
place that runs `systemctl` or `launchctl`, and the seam tests replace). What enable created is
written to a manifest (`tunneld.state.manifests`), so disable removes exactly that.
"""
