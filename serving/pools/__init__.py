"""Pool replicas: the engine behind admission, the token channel, placement, the load board."""
