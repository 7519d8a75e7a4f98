"""The gateway: terminates NATS client connections and routes their messages."""
