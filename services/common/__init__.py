"""What every service shares: server assembly, error mapping, tracing, configuration."""
