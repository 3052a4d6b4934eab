"""Param2-MoE (BharatGen's Param2-17B-A2.4B): transformers loads `param2moe` checkpoints with GLM-4.5's
classes, and their original names are Sarvam-MoE's (transformers' weight conversion says so): the same table."""

from .sarvam_moe import FAMILY  # noqa: F401
