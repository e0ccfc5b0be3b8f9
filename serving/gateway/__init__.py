"""The gateway replica: HTTP ingress, request path, pool directory."""
