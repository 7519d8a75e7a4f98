"""Load generation for mq9: a raw-protocol NATS client (``rawnats``) and the side-by-side
benchmark against nats-server (``python -m loadtest.bench``, ``make bench``)."""
