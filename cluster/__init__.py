"""Cluster metadata: the slot map (``slots``), the replicated state (``state``), the Raft
metadata group (``metadata``, on pysyncobj through ``raft``, with its files in
``local_files``), the rebalancer and the slot mover beside it (``rebalance``, ``mover``) and
the control channel (``control``, ``control_server``, ``admin``)."""
