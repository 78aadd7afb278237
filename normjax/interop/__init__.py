"""Pretrained models in and out: Hugging Face LLaMA, GPT-2 and ViT directories (``normjax.interop.hf``)."""

from normjax.interop.hf import check_exportable, from_hf, hf_config, to_hf

__all__ = ["check_exportable", "from_hf", "hf_config", "to_hf"]
