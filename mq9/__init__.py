"""mq9: a message broker for AI agents that speaks the NATS protocol."""

__version__ = "0.1.0"
