"""NRI: the runtime side of the Node Resource Interface (containerd/nri v0.12)."""
