"""Layer 4, the plugin system: discovery of entry points and the core's own registrations."""
