"""Build tooling for synthehr (container images). Not shipped in the synthehr wheel, not imported by the library."""
