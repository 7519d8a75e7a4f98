"""Load generation against an mq9 server, installed with the package.

- ``rawnats``: a raw-protocol asyncio NATS client, much cheaper per message than the broker
  it measures (uvloop, batched writes, count-only parsing).
- ``workloads``: the mailbox workloads (mailbox create/delete rate, acked sends, replay of a
  stored backlog, request/reply round trips) and the primitives they are made of.

``mq9 bench`` (``mq9.tools.bench``) runs the workloads against any server URL;
``make bench`` (``loadtest/bench.py``) runs the same primitives against a local mq9 node and a
local nats-server side by side.
"""
