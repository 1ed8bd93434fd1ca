"""earthkamal-agent: release a Kamal app by pushing a git tag."""

__version__ = "0.1.0"
