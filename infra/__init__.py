"""How the real services of the local stack are installed, configured, started and stopped."""
