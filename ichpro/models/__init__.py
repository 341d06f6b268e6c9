"""ICHPro's networks: encoders, joint-attention fusion, heads, and the assembled model."""

from ichpro.models.contract import ModelOutput, PrognosisModel
from ichpro.models.ichpro import ICHPro, build_model

__all__ = ["ICHPro", "ModelOutput", "PrognosisModel", "build_model"]
