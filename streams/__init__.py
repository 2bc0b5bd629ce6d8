"""The summit side: producers of OCS events, EFD telemetry and camera readout,
recorders of live topics, and replay of recorded nights."""
