"""Fakes of third parties, speaking their real wire formats."""
