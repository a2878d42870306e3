"""Adapters that route other libraries' checkpoint calls to distckpt."""
