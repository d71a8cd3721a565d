"""Deployment material for the scale-out path; `infra.stack` starts the local stack on loopback."""
