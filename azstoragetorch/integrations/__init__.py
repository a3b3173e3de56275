"""Adapters that plug azstoragetorch into PyTorch Lightning and torch.distributed.checkpoint.

Empty for now; the integrations arrive in later releases.
"""
