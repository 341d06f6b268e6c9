"""ICHPro's networks: encoders, joint-attention fusion, heads, and the assembled model."""

from ichpro.models.ichpro import ICHPro, ICHProOutput, build_model

__all__ = ["ICHPro", "ICHProOutput", "build_model"]
