"""OCI runtime layer: spec generation from CRI configs (spec, user, seccomp) and the runc /
conmon drivers."""
