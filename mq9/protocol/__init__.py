"""The NATS client protocol: parsing what clients send, the error texts, subject rules."""

# The nats-server release whose client protocol mq9 speaks, sent as INFO and /varz
# "version" (clients gate features on it; nats-py reads its major). Chosen as the first
# release with everything mq9 does on the client port: headers and no_responders (2.2),
# TLS handshake_first (2.10.4), and the INFO with "connect_info" after the first PONG
# (2.12). tests/test_protocol_diff.py holds mq9 to a live nats-server 2.15.1 byte for byte.
# mq9's own version travels separately as "mq9_version".
NATS_VERSION = "2.12.0"
