"""Load generation for mq9 that needs a checkout: the side-by-side benchmark against
nats-server (``python -m loadtest.bench``, ``make bench``), locust, the cluster hop. The raw
NATS client and the mailbox workloads they share with ``mq9 bench`` are in ``mq9.bench``."""
