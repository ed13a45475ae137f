"""The embedded local cluster: worker processes on this machine, supervised."""
