"""Pool replicas: the engine behind admission, the token channel, the load board."""
