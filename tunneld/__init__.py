"""tunneld: keep the LocalForwards of an ssh_config host up, in the background."""

__version__ = "0.1.0"
