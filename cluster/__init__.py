"""Cluster metadata: the slot map now; the Raft metadata group comes with the cluster issue."""
