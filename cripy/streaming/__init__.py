"""The streaming server: Exec, Attach and PortForward over SPDY/3.1 and WebSocket."""
