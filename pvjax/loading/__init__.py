"""Checkpoint readers. Each maps every source tensor explicitly and fails on a missing or unused one."""
