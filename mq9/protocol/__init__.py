"""The NATS client protocol: parsing what clients send, the error texts, subject rules."""
