"""The embedded default: a small MNIST CNN with a BadNets backdoor, built reproducibly on 2 CPU cores."""

__all__ = []
