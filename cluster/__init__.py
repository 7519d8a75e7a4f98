"""Cluster metadata: the slot map (``slots``), the replicated state (``state``), the Raft
metadata group (``metadata``), the rebalancer (``rebalance``) and the admin side
(``control``, ``admin``)."""
